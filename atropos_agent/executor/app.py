"""The executor service's HTTP routes (docs/protocol.md): parse, call the executor, answer.

Routes are thin and live on ``router``; the work is in ``executor.py``, and errors answer
themselves (``atropos_agent.errors``, installed by ``web.install_error_handlers``).

``atropos_agent.executor.app:app`` reads its settings from the environment (for
``uvicorn atropos_agent.executor.app:app``); ``create_app(settings)`` builds one with explicit
settings.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from atropos_agent import __version__
from atropos_agent.errors import BackendError
from atropos_agent.executor.backends import create_backend
from atropos_agent.executor.execute_route import ExecuteRoute
from atropos_agent.executor.executor import ENDED_MEMORY, Executor
from atropos_agent.executor.external_tools import ExternalTools
from atropos_agent.executor.lease_journal import LeaseJournal
from atropos_agent.executor.metrics import ExecutorMetrics
from atropos_agent.executor.metrics_port import with_metrics_port
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.executor.shipping import Shipping
from atropos_agent.executor.templates import TemplateRegistry
from atropos_agent.executor.transport import AiohttpTransport
from atropos_agent.executor.workspaces import Workspaces, decoded, one_chunk
from atropos_agent.models import (
    MAX_ID_CHARS,
    ArtifactArchiveRequest,
    ArtifactArchiveResponse,
    ArtifactListRequest,
    ArtifactListResponse,
    ArtifactReadRequest,
    ArtifactReadResponse,
    CancelRequest,
    CancelResponse,
    DiffRequest,
    DiffResponse,
    ExecuteBatchRequest,
    ExecuteBatchResponse,
    ExecuteRequest,
    ForkRequest,
    ForkResponse,
    GroupReleaseResponse,
    HealthResponse,
    ReleaseRequest,
    ReleaseResponse,
    ServiceInfo,
    StatusResponse,
    TemplateDeleteResponse,
    TemplateInfo,
    TemplateRequest,
    TemplatesResponse,
    ToolResult,
    ToolsResponse,
    TrajectoriesResponse,
    TrajectoryInfo,
    TrajectoryRequest,
    UploadOptions,
    UploadRequest,
    UploadResponse,
)
from atropos_agent.sandbox.protocol import OutputEvent
from atropos_agent.sandbox.tools import SANDBOX_TOOL_SCHEMAS
from atropos_agent.serving import (
    ON_DISCONNECT,
    ExitDeadline,
    ShutdownWatch,
    log_events,
    raise_open_file_limit,
    tune_running_server,
)
from atropos_agent.web import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    BodyRule,
    SafeJSONResponse,
    encode_json,
    install_error_handlers,
    metrics_response,
)

log = logging.getLogger("atropos.api")

SERVICE_NAME = "Atropos tool executor"
NDJSON = "application/x-ndjson"
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {NDJSON: {}}, "description": "output events, then the result"}
}

router = APIRouter()


def executor_of(request: Request) -> Executor:
    executor: Executor = request.app.state.executor
    return executor


@router.get("/")
async def root() -> ServiceInfo:
    return ServiceInfo(message=SERVICE_NAME, version=__version__)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    pool = executor_of(request).pool
    ok, reason = pool.healthy()
    if ok:
        answer = HealthResponse(status="ok", workspace_layers=pool.workspace_layers())
        return JSONResponse(answer.model_dump(exclude_none=True))
    answer = HealthResponse(
        status="starting" if reason == "starting" else "degraded", reason=reason
    )
    return JSONResponse(answer.model_dump(), status_code=503)


@router.get("/status")
async def status(request: Request) -> StatusResponse:
    return executor_of(request).status()


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (docs/operations.md, "Metrics"). Async: a scrape reads the pool's
    state in the event loop, where it changes."""
    registry = executor_of(request).metrics.registry
    return metrics_response(registry, request.headers.get("accept"))


@router.get("/tools")
async def tools(request: Request) -> ToolsResponse:
    external = executor_of(request).external.schemas.values()
    return ToolsResponse(tools=SANDBOX_TOOL_SCHEMAS + list(external))


@router.get("/trajectories")
async def trajectories(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
    group: str | None = Query(None, max_length=MAX_ID_CHARS),
) -> TrajectoriesResponse:
    return executor_of(request).describe_trajectories(offset, limit, group)


@router.post("/trajectories")
async def open_trajectory(body: TrajectoryRequest, request: Request) -> TrajectoryInfo:
    return await executor_of(request).open_trajectory(body.trajectory_id, body)


@router.post("/execute")
async def execute(call: ExecuteRequest, request: Request) -> ToolResult:
    executor = executor_of(request)
    executor.admit()
    watcher = cancel_on_disconnect(request, executor, [asyncio.current_task()])
    try:
        return await executor.execute(call.trajectory_id, call.tool, call.timeout_s, call)
    finally:
        if watcher is not None:
            watcher.cancel()


@router.post("/execute/stream", response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def execute_stream(call: ExecuteRequest, request: Request) -> StreamingResponse:
    """``/execute`` answered as NDJSON: ``{"type": "output", "stream", "data"}`` lines as the
    command prints, then ``{"type": "result", ...ToolResult}``. A client that goes away cancels
    the call as on ``/execute``."""
    executor = executor_of(request)
    executor.admit()
    events: asyncio.Queue[OutputEvent] = asyncio.Queue()
    running = asyncio.ensure_future(
        executor.execute(call.trajectory_id, call.tool, call.timeout_s, call, events.put_nowait)
    )
    return StreamingResponse(streamed(executor, running, events), media_type=NDJSON)


async def streamed(
    executor: Executor, running: asyncio.Task[ToolResult], events: asyncio.Queue[OutputEvent]
) -> AsyncIterator[bytes]:
    """The call's output events as they come, then its result."""
    try:
        while not (running.done() and events.empty()):
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait([next_event, running], return_when=asyncio.FIRST_COMPLETED)
            if next_event.done():
                yield next_event.result().model_dump_json().encode() + b"\n"
            else:
                next_event.cancel()
        yield encode_json({"type": "result", **running.result().model_dump()}) + b"\n"
    finally:
        if not running.done():
            executor.cancel_task(running, "the client disconnected before the answer")


@router.post("/execute_batch")
async def execute_batch(batch: ExecuteBatchRequest, request: Request) -> ExecuteBatchResponse:
    executor = executor_of(request)
    executor.admit(len(batch.calls))
    running = [
        asyncio.ensure_future(executor.execute(c.trajectory_id, c.tool, c.timeout_s, c))
        for c in batch.calls
    ]
    watcher = cancel_on_disconnect(request, executor, running)
    try:
        return ExecuteBatchResponse(results=list(await asyncio.gather(*running)))
    finally:
        if watcher is not None:
            watcher.cancel()


def cancel_on_disconnect(
    request: Request, executor: Executor, calls: Sequence[asyncio.Future[Any] | None]
) -> asyncio.Task[None] | None:
    """Cancel ``calls`` (their commands killed) if the client goes away before the answer;
    their results are kept only for a retry with the same uniq_id.

    Our HTTP protocol calls back when the connection is lost (``serving.ON_DISCONNECT``): no
    cost per call. Under another server, a task watches for the disconnect; the caller
    cancels it (the task returned) when it answers.
    """

    def cancel() -> None:
        for call in calls:
            if isinstance(call, asyncio.Task):
                executor.cancel_task(call, "the client disconnected before the answer")

    callbacks = request.scope.get(ON_DISCONNECT)
    if callbacks is not None:
        callbacks.append(cancel)
        return None

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel()

    return asyncio.ensure_future(watch())


@router.post("/release", response_model_exclude_none=True)
async def release(body: ReleaseRequest, request: Request) -> ReleaseResponse | GroupReleaseResponse:
    executor = executor_of(request)
    if body.group is not None:
        return await executor.release_group(body.group, body.reset_workspace)
    assert body.trajectory_id is not None
    return await executor.release(body.trajectory_id, body.reset_workspace)


@router.post("/cancel")
async def cancel(body: CancelRequest, request: Request) -> CancelResponse:
    return executor_of(request).cancel(body.trajectory_id)


@router.post("/artifacts/read")
async def artifacts_read(body: ArtifactReadRequest, request: Request) -> ArtifactReadResponse:
    return await executor_of(request).read_artifact(body)


@router.post("/artifacts/list")
async def artifacts_list(body: ArtifactListRequest, request: Request) -> ArtifactListResponse:
    return await executor_of(request).list_artifacts(body)


@router.post("/artifacts/archive")
async def artifacts_archive(
    body: ArtifactArchiveRequest, request: Request
) -> ArtifactArchiveResponse:
    return await executor_of(request).archive_artifacts(body)


# ---- workspaces: uploads, templates, forks, diffs (docs/executor.md, "Preparing once, running
# many"). A raw body (an archive) is streamed through as it arrives, never held whole.

GZIP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def workspaces_of(request: Request) -> Workspaces:
    workspaces: Workspaces = request.app.state.workspaces
    return workspaces


def checked_id(value: str, what: str) -> str:
    """An id from the URL path, held to the rules of one in a body (422 otherwise)."""
    try:
        return TrajectoryRequest(trajectory_id=value).trajectory_id
    except ValidationError as exc:
        error = {**exc.errors()[0], "loc": ("path", what)}
        raise RequestValidationError([error]) from None


@router.post("/artifacts/upload")
async def artifacts_upload(body: UploadRequest, request: Request) -> UploadResponse:
    content = decoded(body.content, "content")
    return await workspaces_of(request).upload(
        body.trajectory_id, body.path, body.format, content, body
    )


@router.put("/trajectories/{trajectory_id}/archive", openapi_extra=GZIP_BODY)
async def trajectory_archive(
    trajectory_id: str, options: Annotated[UploadOptions, Query()], request: Request
) -> UploadResponse:
    """``/artifacts/upload`` with the archive as the raw body (``application/gzip``)."""
    trajectory_id = checked_id(trajectory_id, "trajectory_id")
    return await workspaces_of(request).upload(
        trajectory_id, options.path, options.format, request.stream(), options
    )


@router.post("/templates")
async def create_template(body: TemplateRequest, request: Request) -> TemplateInfo:
    workspaces = workspaces_of(request)
    if body.trajectory_id is not None:
        return await workspaces.template_of(body.name, body.trajectory_id)
    assert body.content is not None
    return await workspaces.create_template(body.name, one_chunk(decoded(body.content, "content")))


@router.put("/templates/{name:path}", openapi_extra=GZIP_BODY)
async def put_template(name: str, request: Request) -> TemplateInfo:
    """``POST /templates {name, content}`` with the archive as the raw body."""
    name = checked_id(name, "name")
    return await workspaces_of(request).create_template(name, request.stream())


@router.get("/templates")
async def list_templates(request: Request) -> TemplatesResponse:
    return TemplatesResponse(templates=workspaces_of(request).list_templates())


@router.delete("/templates/{name:path}")
async def delete_template(name: str, request: Request) -> TemplateDeleteResponse:
    workspaces_of(request).delete_template(name)
    return TemplateDeleteResponse(name=name)


@router.post("/fork")
async def fork(body: ForkRequest, request: Request) -> ForkResponse:
    return await workspaces_of(request).fork(body)


@router.post("/artifacts/diff")
async def artifacts_diff(body: DiffRequest, request: Request) -> DiffResponse:
    return await workspaces_of(request).diff(body.trajectory_id)


def body_rules(settings: ExecutorSettings) -> list[BodyRule]:
    """Uploads and templates take archives up to ``TOOL_EXECUTOR_UPLOAD_MAX_MB``: as raw
    bodies, or as base64 in JSON (4/3 of the bytes, and a little JSON around them)."""
    upload = settings.upload_max_mb * 1024 * 1024
    as_json = max(settings.max_request_bytes, upload * 4 // 3 + 64 * 1024)
    return [
        BodyRule("POST", re.compile("/artifacts/upload"), as_json),
        BodyRule("POST", re.compile("/templates"), as_json),
        BodyRule("PUT", re.compile("/trajectories/[^/]+/archive"), upload, raw=True),
        BodyRule("PUT", re.compile("/templates/.+"), upload, raw=True),
    ]


def build_executor(settings: ExecutorSettings) -> Executor:
    """The executor and everything it owns: pool, backend, transport, external tools."""
    transport = AiohttpTransport()
    metrics = ExecutorMetrics(settings.backend, settings.pool_job_id, settings.scaling)
    pool = Pool(settings.pool(), create_backend(settings, transport), transport, metrics)
    token = settings.tool_server_token.get_secret_value() if settings.tool_server_token else None
    # Room for every remembered end and every slot the pool can lease at once.
    capacity = ENDED_MEMORY + settings.slots * settings.max_containers
    journal = LeaseJournal.configured(settings.journal(), capacity)
    external = ExternalTools(settings.tool_server_url, token)
    shipping = Shipping(TemplateRegistry(settings.workspaces()))
    return Executor(settings.calls(), pool, external, journal, metrics, shipping)


def create_app(settings: ExecutorSettings | None = None) -> FastAPI:
    settings = settings or ExecutorSettings()
    executor = build_executor(settings)
    assert executor.shipping is not None
    workspaces = Workspaces(executor, executor.shipping)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_events()
        open_files = raise_open_file_limit()
        try:
            await executor.start()
            # After the journal's lock: one live executor per identity uses its templates.
            workspaces.registry.open()
        except BackendError as exc:
            log.error("event=startup_failed backend=%s error=%s", settings.backend, exc)
            await executor.stop()
            raise
        # Before the watch below takes over the SIGTERM handler that names the server.
        tune_running_server(settings.connections(), settings.shutdown_grace_s + 1)
        deadline = ExitDeadline(settings.shutdown_timeout_s)

        def on_signal() -> None:
            deadline.start()
            executor.begin_shutdown(settings.shutdown_grace_s)

        watch = ShutdownWatch(on_signal)
        log.info(
            "event=executor_ready backend=%s port=%d open_file_limit=%d",
            settings.backend,
            settings.port,
            open_files,
        )
        try:
            yield
        finally:
            watch.restore()
            try:
                await asyncio.wait_for(executor.stop(), deadline.remaining())
            except TimeoutError:
                log.error("event=stop_overran: sandboxes left to die with this process")
            workspaces.registry.close()

    app = FastAPI(
        title=SERVICE_NAME,
        version=__version__,
        lifespan=with_metrics_port(
            lifespan, executor.metrics.registry, settings.metrics_host, settings.metrics_port
        ),
        default_response_class=SafeJSONResponse,
    )
    app.state.executor = executor
    app.state.workspaces = workspaces
    app.include_router(router)
    install_error_handlers(app)
    token = settings.token.get_secret_value() if settings.token else None
    # Innermost of the middleware: auth and the body cap below apply to it too.
    app.add_middleware(ExecuteRoute, executor=executor)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_request_bytes, rules=body_rules(settings)
    )
    app.add_middleware(BearerAuthMiddleware, token=token, open_paths={"/", "/health"})
    return app


def __getattr__(name: str) -> Any:
    """``app`` is built on first access, from the environment."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)
