"""``SandboxClient``: the one object that speaks to a sandbox server.

Every request the executor makes to a sandbox goes through here: health, slots (and their
owners), reset, cancel, batch streams, artifacts, workspaces (layers in and out, slots started
on them, uploads, forks, exports, diffs: archives streamed, never held whole), and the wait
for a starting sandbox. It owns the sandbox's address and token, checks the protocol version
when a sandbox is admitted, and turns every way a sandbox can fail to answer into
``SandboxUnavailable`` (or ``ProtocolMismatch``) naming the sandbox; a workspace route's
refusals become what they mean to the caller (``ArchiveRefused``, ``TooLarge``,
``MissingLayers``). Payloads are the typed models of ``sandbox/protocol.py``, which the
sandbox server imports too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, TypeAdapter, ValidationError

from atropos_agent.errors import (
    ArchiveRefused,
    AtroposError,
    MissingLayers,
    ProtocolMismatch,
    SandboxUnavailable,
    TooLarge,
)
from atropos_agent.executor.transport import Body, Request, Response, Transport
from atropos_agent.models import (
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    DiffResponse,
    UploadResponse,
)
from atropos_agent.sandbox.protocol import (
    MIN_PROTOCOL_VERSION,
    STREAM_EVENT,
    BatchItem,
    BatchResult,
    CancelResponse,
    ForkAnswer,
    LayerDropped,
    LayersResponse,
    LayerStored,
    OutputEvent,
    ResetResponse,
    SandboxHealth,
    SlotArtifactArchiveRequest,
    SlotArtifactListRequest,
    SlotArtifactReadRequest,
    SlotForkRequest,
    SlotLease,
    SlotOwnerRequest,
    SlotRequest,
    SlotsResponse,
    SlotState,
    SlotWorkspaceRequest,
    StreamedResult,
)
from atropos_agent.web import without_lone_surrogates

HEALTH_TIMEOUT_S = 2.0
RESET_TIMEOUT_S = 60.0
# The sandbox waits up to 5 s (slot.CANCEL_WAIT_S) for the cancelled call's answer.
CANCEL_TIMEOUT_S = 15.0
ARTIFACT_TIMEOUT_S = 120.0
# Archives in and out (uploads, layers, exports, diffs): the longest pause between two reads.
ARCHIVE_TIMEOUT_S = 600.0
GZIP = "application/gzip"
# Time a sandbox gets beyond the longest timeout in a batch before the executor gives up.
BATCH_GRACE_S = 30.0
HEALTH_POLL_S = 0.05

M = TypeVar("M", bound=BaseModel)

BATCH = TypeAdapter(list[BatchItem])


class SandboxClient:
    def __init__(self, url: str, transport: Transport, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.transport = transport
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"SandboxClient({self.url!r})"

    # ---- health and admission

    async def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> SandboxHealth:
        return await self._call("GET", "/health", None, SandboxHealth, timeout_s)

    async def admit(self) -> tuple[SandboxHealth, list[SlotState]]:
        """Health and slots of a sandbox about to join the pool; refuses a protocol it
        cannot drive with ``ProtocolMismatch``."""
        health = await self.health()
        if health.protocol_version < MIN_PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"sandbox at {self.url} speaks protocol {health.protocol_version} (version "
                f"{health.version}); this executor needs {MIN_PROTOCOL_VERSION} or later "
                "(batch streaming): run a sandbox image of the same release as the executor"
            )
        slots = await self._call("GET", "/slots", None, SlotsResponse, HEALTH_TIMEOUT_S)
        return health, slots.slots

    async def wait_until_healthy(
        self, timeout_s: float, why_not: Callable[[], Awaitable[str | None]] | None = None
    ) -> SandboxHealth:
        """Poll ``/health`` until it answers 200. ``why_not`` may explain early that the
        sandbox will never start (its process exited, Nomad cannot place it): that ends the
        wait with its reason."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            if why_not is not None and (reason := await why_not()):
                raise SandboxUnavailable(f"sandbox at {self.url} will not start: {reason}")
            try:
                return await self.health()
            except SandboxUnavailable as exc:
                last = exc.message
            if time.monotonic() >= deadline:
                raise SandboxUnavailable(
                    f"sandbox at {self.url} not healthy after {timeout_s:g}s (last: {last})"
                )
            await asyncio.sleep(HEALTH_POLL_S)

    # ---- slots

    async def slots(self) -> list[SlotState]:
        """Every slot's state, its owner included (protocol 3)."""
        answer = await self._call("GET", "/slots", None, SlotsResponse, HEALTH_TIMEOUT_S)
        return answer.slots

    async def cancel(self, slot_id: str) -> bool:
        """Stop the call the slot runs now (protocol 3); True when one ran and was stopped.
        Its own answer still arrives on its batch stream, marked ``metadata.cancelled``."""
        body = SlotRequest(slot_id=slot_id).model_dump_json().encode()
        answer = await self._call("POST", "/cancel", body, CancelResponse, CANCEL_TIMEOUT_S)
        return answer.cancelled

    async def set_owner(self, slot_id: str, lease: SlotLease | None) -> SlotState:
        """Record ``lease`` as the slot's owner (None: no owner) without running anything
        (protocol 3); the slot's state."""
        body = SlotOwnerRequest(slot_id=slot_id, lease=lease).model_dump_json().encode()
        return await self._call("POST", "/slots/owner", body, SlotState, HEALTH_TIMEOUT_S)

    async def reset(self, slot_id: str) -> None:
        """Kill every process of the slot and wipe its workspace."""
        body = SlotRequest(slot_id=slot_id).model_dump_json().encode()
        await self._call("POST", "/reset", body, ResetResponse, RESET_TIMEOUT_S)

    async def stream_batch(self, items: list[BatchItem]) -> AsyncGenerator[StreamedResult]:
        """Run a batch; yield each result as soon as its call finished (any order)."""
        longest = max((item.timeout or 0.0) for item in items)
        request = self._request(
            "POST", "/batch/stream", BATCH.dump_json(items), longest + BATCH_GRACE_S
        )
        async with contextlib.aclosing(self._ndjson(request)) as lines:
            async for line in lines:
                yield self._parse(StreamedResult, line, "sent a malformed result line")

    async def execute_streamed(
        self, item: BatchItem, on_output: Callable[[OutputEvent], None]
    ) -> BatchResult:
        """Run one call (protocol 4), its output to ``on_output`` as the command prints it."""
        body = item.model_dump_json(by_alias=True).encode()
        request = self._request(
            "POST", "/execute/stream", body, (item.timeout or 0.0) + BATCH_GRACE_S
        )
        async with contextlib.aclosing(self._ndjson(request)) as lines:
            async for line in lines:
                try:
                    event = STREAM_EVENT.validate_json(line)
                except ValidationError as exc:
                    raise SandboxUnavailable(
                        f"sandbox at {self.url} sent a malformed event line: {short(exc)}"
                    ) from exc
                if isinstance(event, OutputEvent):
                    on_output(event)
                else:
                    return BatchResult.model_validate(event.model_dump(exclude={"type"}))
        raise SandboxUnavailable(f"sandbox at {self.url} ended the stream before the call's result")

    # ---- artifacts

    async def read_artifact(self, request: SlotArtifactReadRequest) -> ArtifactReadResponse:
        return await self._post("/artifacts/read", request, ArtifactReadResponse)

    async def list_artifacts(self, request: SlotArtifactListRequest) -> ArtifactListResponse:
        return await self._post("/artifacts/list", request, ArtifactListResponse)

    async def archive_artifacts(
        self, request: SlotArtifactArchiveRequest
    ) -> ArtifactArchiveResponse:
        return await self._post("/artifacts/archive", request, ArtifactArchiveResponse)

    # ---- workspaces (protocol 5): layers, slots started on them, uploads, forks, diffs

    async def start_workspace(self, slot_id: str, layers: list[str]) -> SlotState:
        """Restart the slot on a workspace made of ``layers`` (newest first), wiping what it
        held; ``MissingLayers`` naming those the sandbox lacks."""
        body = SlotWorkspaceRequest(layers=layers).model_dump_json().encode()
        path = f"/slots/{quote(slot_id)}/workspace"
        return await self._workspace_call("POST", path, body, SlotState, RESET_TIMEOUT_S)

    async def put_layer(self, layer_id: str, body: Body) -> LayerStored:
        """Store a layer's archive (a template's sha256 is checked against its id)."""
        path = f"/layers/{quote(layer_id)}"
        return await self._workspace_call("PUT", path, body, LayerStored, ARCHIVE_TIMEOUT_S, GZIP)

    async def layers(self) -> LayersResponse:
        """The sandbox's layer store: its layers, its budget, its workspace mode."""
        return await self._workspace_call("GET", "/layers", None, LayersResponse, HEALTH_TIMEOUT_S)

    @contextlib.asynccontextmanager
    async def layer_archive(self, layer_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The archive of a layer the sandbox holds, as it arrives."""
        async with self._download(f"/layers/{quote(layer_id)}") as chunks:
            yield chunks

    async def delete_layer(self, layer_id: str) -> None:
        """Drop a layer (kept until no slot uses it)."""
        await self._workspace_call(
            "DELETE", f"/layers/{quote(layer_id)}", None, LayerDropped, HEALTH_TIMEOUT_S
        )

    async def fork_slot(self, slot_id: str, targets: list[str]) -> list[str]:
        """Snapshot the slot's files once and start ``targets`` (slots of this sandbox) on
        them; the fork's layers, newest first, for slots elsewhere."""
        body = SlotForkRequest(targets=targets).model_dump_json().encode()
        path = f"/slots/{quote(slot_id)}/fork"
        answer = await self._workspace_call("POST", path, body, ForkAnswer, ARCHIVE_TIMEOUT_S)
        return answer.layers

    @contextlib.asynccontextmanager
    async def export_slot(self, slot_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """A tar.gz of the slot's whole workspace, as it arrives."""
        async with self._download(f"/slots/{quote(slot_id)}/export") as chunks:
            yield chunks

    async def upload_archive(
        self, slot_id: str, path: str, format: str, body: Body
    ) -> UploadResponse:
        """Extract ``body`` (a tar.gz, or one file) into the slot's workspace at ``path``.
        ``TooLarge`` over a cap; a refused archive is ``success: false``."""
        where = f"/slots/{quote(slot_id)}/archive?" + urlencode({"path": path, "format": format})
        return await self._workspace_call(
            "PUT", where, body, UploadResponse, ARCHIVE_TIMEOUT_S, GZIP
        )

    async def diff_slot(self, slot_id: str) -> DiffResponse:
        """What changed in the slot's workspace since its layers."""
        path = f"/slots/{quote(slot_id)}/diff"
        return await self._workspace_call("GET", path, None, DiffResponse, ARCHIVE_TIMEOUT_S)

    async def _workspace_call(
        self,
        method: str,
        path: str,
        body: Body,
        answer: type[M],
        timeout_s: float,
        content_type: str | None = None,
    ) -> M:
        headers = self.headers
        if content_type is not None:
            headers = {**headers, "Content-Type": content_type}
        request = Request.with_body(method, self.url + path, body, headers, timeout_s)
        async with self.transport.send(request) as response:
            data = await response.read()
        if response.status != 200:
            raise self._refusal(response.status, data, path)
        return self._parse(answer, data, f"answered {path} with an unexpected body")

    @contextlib.asynccontextmanager
    async def _download(self, path: str) -> AsyncIterator[AsyncIterator[bytes]]:
        request = self._request("GET", path, None, ARCHIVE_TIMEOUT_S)
        async with self.transport.send(request) as response:
            if response.status != 200:
                raise self._refusal(response.status, await response.read(), path)
            yield response.chunks()

    def _refusal(self, status: int, body: bytes, path: str) -> AtroposError:
        """What a workspace route's error answer means for the caller."""
        text = error_text(body)
        if status == 413:
            return TooLarge(text)
        if status == 400:
            return ArchiveRefused(text)
        if status == 409:
            missing = missing_layers(body)
            if missing:
                return MissingLayers(f"sandbox at {self.url} lacks layers {missing}", missing)
        return SandboxUnavailable(f"sandbox at {self.url} answered {status} to {path}: {text}")

    # ---- plumbing

    async def _ndjson(self, request: Request) -> AsyncGenerator[bytes]:
        """The non-empty lines of a streamed answer, as they arrive; an error status raises."""
        async with self.transport.send(request) as response:
            if response.status != 200:
                await self._checked(response)
            async for line in response.lines():
                if line.strip():
                    yield line

    def _request(self, method: str, path: str, body: bytes | None, timeout_s: float) -> Request:
        return Request(method, self.url + path, body, self.headers, timeout_s)

    async def _post(self, path: str, payload: BaseModel, answer: type[M]) -> M:
        body = payload.model_dump_json().encode()
        return await self._call("POST", path, body, answer, ARTIFACT_TIMEOUT_S)

    async def _call(
        self, method: str, path: str, body: bytes | None, answer: type[M], timeout_s: float
    ) -> M:
        async with self.transport.send(self._request(method, path, body, timeout_s)) as response:
            data = await self._checked(response)
        return self._parse(answer, data, f"answered {path} with an unexpected body")

    def _parse(self, answer: type[M], data: bytes, what: str) -> M:
        try:
            return answer.model_validate_json(data)
        except ValidationError as exc:
            lenient = leniently_parsed(answer, data) if is_json_invalid(exc) else None
            if lenient is None:
                raise SandboxUnavailable(f"sandbox at {self.url} {what}: {short(exc)}") from exc
            return lenient

    async def _checked(self, response: Response) -> bytes:
        data = await response.read()
        if response.status != 200:
            raise SandboxUnavailable(
                f"sandbox at {self.url} answered {response.status}: {error_text(data)}"
            )
        return data


def is_json_invalid(exc: ValidationError) -> bool:
    return any(error["type"] == "json_invalid" for error in exc.errors())


def leniently_parsed(answer: type[M], data: bytes) -> M | None:
    """An answer pydantic's strict JSON parser refused, read as Python's json reads it: lone
    surrogate escapes (an older sandbox's for file names that are not UTF-8) and invalid
    bytes become U+FFFD, so the result of a call that ran is not lost. None if still invalid.
    """
    try:
        decoded = json.loads(data.decode(errors="replace"))
        return answer.model_validate(without_lone_surrogates(decoded))
    except (ValueError, RecursionError):  # a ValidationError is a ValueError
        return None


def error_text(body: bytes) -> str:
    """The ``error`` of a JSON error answer, else the start of the body."""
    try:
        decoded = json.loads(body)
        if isinstance(decoded, dict) and decoded.get("error"):
            return str(without_lone_surrogates(str(decoded["error"])))
    except (ValueError, RecursionError):
        pass
    return body.decode(errors="replace")[:300].strip() or "an empty body"


def missing_layers(body: bytes) -> list[str]:
    """The ``missing`` of a 409 answer to a slot's workspace request (else empty)."""
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return []
    missing = decoded.get("missing") if isinstance(decoded, dict) else None
    return [str(layer) for layer in missing] if isinstance(missing, list) else []


def short(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc)
    where = ".".join(str(part) for part in errors[0]["loc"])
    return f"{where or 'body'}: {errors[0]['msg']}"
