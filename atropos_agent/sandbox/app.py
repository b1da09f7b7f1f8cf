"""The sandbox server's HTTP face: thin routes over the ``Sandbox`` (``server.py``).

Each route parses its body into a protocol model (``protocol.py``), hands it to the sandbox,
and answers with a response model. Errors are ``AtroposError``s (unknown slot 404 on /reset,
/cancel, /slots/owner and /artifacts/*, slot queue full 503), answered by
``web.install_error_handlers``.

The call routes (``/batch``, ``/batch/stream``, ``/execute``) take the body as raw JSON: each
item is checked alone (``Sandbox.admit``), so an unknown slot or tool or an invalid field fails
that item only, as the old containers did. Only a body that is not JSON (400) or not a list of
objects (an object for ``/execute``; 422) refuses the request.

Results of calls, the hot path, leave as JSON bytes that pydantic-core serialises from the
models the sandbox built (``server.RESULTS``): FastAPI would otherwise validate them a second
time and encode them twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from atropos_agent import __version__
from atropos_agent.models import (
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    Identifier,
    PathText,
    UploadResponse,
)
from atropos_agent.sandbox import workspace_routes
from atropos_agent.sandbox.agent.framing import (
    OP_ARTIFACT_ARCHIVE,
    OP_ARTIFACT_LIST,
    OP_ARTIFACT_READ,
)
from atropos_agent.sandbox.protocol import (
    BatchItem,
    BatchResult,
    CancelResponse,
    ResetResponse,
    SandboxHealth,
    SlotArtifactArchiveRequest,
    SlotArtifactListRequest,
    SlotArtifactReadRequest,
    SlotOwnerRequest,
    SlotRequest,
    SlotsResponse,
    SlotState,
    StreamedResult,
    UploadFormat,
)
from atropos_agent.sandbox.server import RESULT, RESULTS, Admitted, Sandbox
from atropos_agent.sandbox.settings import SandboxSettings
from atropos_agent.web import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    BodyRule,
    SafeJSONResponse,
    install_error_handlers,
    metrics_response,
)

NDJSON = "application/x-ndjson"


def sandbox_of(request: Request) -> Sandbox:
    """The sandbox the app serves (``create_app`` puts it in ``app.state``).

    Read here rather than injected with ``Depends``: resolving a dependency costs every request
    some 15-20 µs (measured), and ``/batch`` is the hot path.
    """
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox


router = APIRouter()


def json_bytes(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def refuse(kind: str, message: str, where: tuple[str | int, ...] = ("body",)) -> None:
    """Refuse the whole request as FastAPI would have (``web.validation_error``: 400 for
    malformed JSON, 422 for the wrong shape)."""
    error: dict[str, Any] = {"type": kind, "loc": where, "msg": message, "input": None}
    raise RequestValidationError([error])


async def decoded(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        error = {
            "type": "json_invalid",
            "loc": ("body", position),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": getattr(exc, "msg", str(exc))},
        }
        raise RequestValidationError([error]) from None


async def batch_of(request: Request) -> list[Admitted]:
    """The items of a batch body, each admitted alone (``Sandbox.admit``)."""
    entries = await decoded(request)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        refuse(
            "list_type",
            "a batch must be a JSON list of objects ({slot_id, tool, args, execution_id, timeout})",
        )
    return sandbox_of(request).admit(entries)


def body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The documented request body of a route that reads it raw."""
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


ITEM_SCHEMA = BatchItem.model_json_schema(by_alias=True)
BATCH_BODY = body_schema({"type": "array", "items": ITEM_SCHEMA})


@router.get("/health", response_model=SandboxHealth)
async def health(request: Request) -> SandboxHealth:
    """Counts and modes only: open without a token, for orchestrators' checks."""
    return sandbox_of(request).health()


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: calls, limits hit, slot states (``metrics.py``). Async: a scrape
    reads the slots in the event loop, where they change."""
    registry = sandbox_of(request).metrics.registry
    return metrics_response(registry, request.headers.get("accept"))


@router.get("/slots", response_model=SlotsResponse)
async def slots(request: Request) -> SlotsResponse:
    return sandbox_of(request).describe_slots()


@router.post("/batch", response_model=list[BatchResult], openapi_extra=BATCH_BODY)
async def batch(request: Request) -> Response:
    """Protocol 1: every result, in the order of the items, once all are done."""
    items = await batch_of(request)
    return json_bytes(RESULTS.dump_json(await sandbox_of(request).run_batch(items)))


# One NDJSON line per item, as its call finishes; documented here since a stream has no
# response model of its own.
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one StreamedResult per line, in the order the calls finish",
        "content": {NDJSON: {"schema": StreamedResult.model_json_schema(by_alias=True)}},
    }
}


@router.post(
    "/batch/stream",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
    openapi_extra=BATCH_BODY,
)
async def batch_stream(request: Request) -> StreamingResponse:
    """Protocol 2: each result as its own NDJSON line as soon as it is ready."""
    items = await batch_of(request)
    return StreamingResponse(sandbox_of(request).stream_batch(items), media_type=NDJSON)


@router.post("/execute", response_model=BatchResult, openapi_extra=body_schema(ITEM_SCHEMA))
async def execute(request: Request) -> Response:
    """Protocol 1: one item, answered with its result."""
    entry = await decoded(request)
    if not isinstance(entry, dict):
        refuse("dict_type", "an item must be a JSON object ({slot_id, tool, args, ...})")
    sandbox = sandbox_of(request)
    results = await sandbox.run_batch(sandbox.admit([entry]))
    return json_bytes(RESULT.dump_json(results[0]))


@router.post(
    "/execute/stream",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
    openapi_extra=body_schema(ITEM_SCHEMA),
)
async def execute_stream(request: Request) -> StreamingResponse:
    """Protocol 4: one item, its output as NDJSON events as the command prints, then its
    result (``Sandbox.stream_call``)."""
    entry = await decoded(request)
    if not isinstance(entry, dict):
        refuse("dict_type", "an item must be a JSON object ({slot_id, tool, args, ...})")
    sandbox = sandbox_of(request)
    return StreamingResponse(sandbox.stream_call(sandbox.admit([entry])[0]), media_type=NDJSON)


@router.post("/reset", response_model=ResetResponse)
async def reset(body: SlotRequest, request: Request) -> ResetResponse:
    """Wait for the slot's queued calls, kill its processes, wipe its files, start it anew."""
    await sandbox_of(request).slot(body.slot_id).reset()
    # The old containers' answer, with our fields beside it.
    return ResetResponse(output=f"Reset workspace for {body.slot_id}", slot_id=body.slot_id)


@router.post("/cancel", response_model=CancelResponse)
async def cancel(body: SlotRequest, request: Request) -> CancelResponse:
    """Stop the call the slot runs now (not those queued behind it), as a timeout would."""
    cancelled = await sandbox_of(request).cancel(body.slot_id)
    return CancelResponse(slot_id=body.slot_id, cancelled=cancelled)


@router.post("/slots/owner", response_model=SlotState)
async def slot_owner(body: SlotOwnerRequest, request: Request) -> SlotState:
    """Record who holds the slot (an executor leasing it without a call), running nothing."""
    return sandbox_of(request).set_owner(body.slot_id, body.lease)


# Artifact answers take the artifact response shapes, failures included (success false + error).
@router.post("/artifacts/read", response_model=ArtifactReadResponse)
async def artifacts_read(body: SlotArtifactReadRequest, request: Request) -> ArtifactReadResponse:
    answer = await sandbox_of(request).artifact(OP_ARTIFACT_READ, body)
    return ArtifactReadResponse.model_validate(answer)


@router.post("/artifacts/list", response_model=ArtifactListResponse)
async def artifacts_list(body: SlotArtifactListRequest, request: Request) -> ArtifactListResponse:
    answer = await sandbox_of(request).artifact(OP_ARTIFACT_LIST, body)
    return ArtifactListResponse.model_validate(answer)


@router.post("/artifacts/archive", response_model=ArtifactArchiveResponse)
async def artifacts_archive(
    body: SlotArtifactArchiveRequest, request: Request
) -> ArtifactArchiveResponse:
    answer = await sandbox_of(request).artifact(OP_ARTIFACT_ARCHIVE, body)
    return ArtifactArchiveResponse.model_validate(answer)


# The body of PUT /slots/{slot_id}/archive: bytes, read as they arrive (uploads.py).
RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ARCHIVE_ROUTE = re.compile(r"/slots/[^/]+/archive")


@router.put(
    "/slots/{slot_id}/archive",
    response_model=UploadResponse,
    responses={413: {"model": UploadResponse, "description": "over the size or entry cap"}},
    openapi_extra=RAW_BODY,
)
async def slot_archive(
    slot_id: Identifier,
    request: Request,
    path: Annotated[PathText, Query()] = ".",
    archive_format: Annotated[UploadFormat, Query(alias="format")] = "tar.gz",
) -> Response:
    """Protocol 5: the raw body (a tar.gz, or one file) extracted into the slot's workspace at
    ``path`` by the slot's agent, checked first, all or nothing (docs/sandbox.md, "Uploads")."""
    answer, over_cap = await sandbox_of(request).upload(
        slot_id, request.stream(), path, archive_format
    )
    return SafeJSONResponse(answer.model_dump(), status_code=413 if over_cap else 200)


def create_app(settings: SandboxSettings | None = None) -> FastAPI:
    """The sandbox server for ``settings``; its slots start with the app (lifespan)."""
    settings = settings or SandboxSettings()
    sandbox = Sandbox(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(
        title="atropos sandbox server",
        version=__version__,
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.sandbox = sandbox
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(workspace_routes.router)
    token = settings.token.get_secret_value() if settings.token else None
    upload = BodyRule("PUT", ARCHIVE_ROUTE, settings.upload_max_bytes, raw=True)
    layer = BodyRule("PUT", workspace_routes.LAYER_ROUTE, settings.upload_max_bytes, raw=True)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_request_bytes, rules=[upload, layer]
    )
    app.add_middleware(BearerAuthMiddleware, token=token, open_paths={"/health"})
    return app
