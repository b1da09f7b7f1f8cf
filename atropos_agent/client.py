"""The trainer-side client: the executor's routes as methods, sync and async.

    from atropos_agent.client import ExecutorClient

    with ExecutorClient("http://127.0.0.1:9001", token="...") as executor:
        result = executor.execute("trajectory-1", "terminal", {"command": "ls"})
        files = executor.list_artifacts("trajectory-1", recursive=True)
        executor.release("trajectory-1")

Workspaces (docs/executor.md, "Preparing once, running many"): ``upload_dir`` packs a local
folder and sends it raw; ``create_template``, ``fork`` and ``diff`` (unpacked into a local
folder) prepare once and fan out.

``AsyncExecutorClient`` has the same methods as coroutines. HTTP errors (401, 404, 503...)
raise ``ExecutorError`` with the service's message; a tool that failed is not an error, it is a
``ToolResult`` with ``success`` false.

What is safe to retry is retried (``retries`` times, with back-off): a request that never
reached the service (connection refused), a 503 that says when to come back (``Retry-After``:
the service ran nothing), and any transport failure of a request that is safe to repeat:
reads, and ``execute``, which always sends a ``uniq_id`` (the service runs a call once per
``uniq_id`` and answers a repeat with the first result). Release, batches of calls without
their own ``uniq_id``, uploads and forks are never sent twice (a fork that failed took no
lease, and its 503 says so: that one is retried).

Laid out as httpx lays out its own clients: ``BaseClient`` knows, for every route, the request
to send and what its answer becomes (a ``Call``); ``ExecutorClient`` and
``AsyncExecutorClient`` only send it, one over ``httpx.Client``, the other over
``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from atropos_agent.errors import ArchiveRefused, ExecutorError
from atropos_agent.models import (
    MAX_TIMEOUT_S,
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    CancelResponse,
    DiffResponse,
    ExecuteBatchResponse,
    ForkResponse,
    GroupReleaseResponse,
    LeaseOptions,
    OutputChunk,
    ReleaseResponse,
    StatusResponse,
    TemplateDeleteResponse,
    TemplateInfo,
    TemplatesResponse,
    ToolCall,
    ToolResult,
    TrajectoryInfo,
    UploadResponse,
)

__all__ = ["AsyncExecutorClient", "BaseClient", "Call", "ExecutorClient", "ExecutorError"]

# The HTTP read timeout covers the longest command the service honours, plus its grace.
READ_TIMEOUT_S = MAX_TIMEOUT_S + 90
RETRIES = 3
# The longest wait a Retry-After may impose before the next attempt.
MAX_RETRY_WAIT_S = 10.0
# Connections idle longer than this are not reused: well under the service's keep-alive (75 s)
# and any proxy's, so that no request goes out on a connection being closed.
KEEPALIVE_EXPIRY_S = 4.0

T = TypeVar("T")
A = TypeVar("A", ArtifactReadResponse, ArtifactListResponse, ArtifactArchiveResponse)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to the service, and how its answer's JSON becomes the value returned."""

    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any], T]
    # Sending it twice does no harm: it only reads, or the service runs it once.
    idempotent: bool = False
    # A raw body (an archive) instead of ``body``, and the query.
    content: bytes | None = None
    params: dict[str, Any] | None = None

    def request(self) -> dict[str, Any]:
        """The arguments of ``httpx.Client.request`` after the method and path."""
        if self.content is None:
            return {"json": self.body, "params": self.params}
        headers = {"Content-Type": "application/gzip"}
        return {"content": self.content, "params": self.params, "headers": headers}

    def answer(self, response: httpx.Response) -> T:
        """The parsed answer; ``ExecutorError`` when the service refused the request."""
        if response.status_code >= 400:
            raise ExecutorError(response.status_code, error_message(response))
        return self.parse(response.json())


def error_message(response: httpx.Response) -> str:
    """The service's own words (``{"error": ...}``, or FastAPI's ``detail``), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or response.text)
    return response.text


def batch_results(answer: Any) -> list[ToolResult]:
    return ExecuteBatchResponse.model_validate(answer).results


def template_list(answer: Any) -> list[TemplateInfo]:
    return TemplatesResponse.model_validate(answer).templates


# ---- archives on the trainer's side: a folder packed for an upload, a diff unpacked


def archive_of_dir(local_path: str | os.PathLike[str]) -> bytes:
    """A tar.gz of the folder's contents (its files, directories and symbolic links, as
    links; modes and mtimes kept, owners left out: the workspace's uid owns them). FIFOs,
    sockets and devices are left out: a workspace takes none."""
    root = Path(local_path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")

    def portable(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            return None
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz", compresslevel=6) as archive:
        for entry in sorted(root.iterdir()):
            archive.add(entry, arcname=entry.name, filter=portable)
    return packed.getvalue()


def archive_of_file(local_file: str | os.PathLike[str]) -> bytes:
    return Path(local_file).read_bytes()


# Extraction of archives checked by ``unpacking_order``: tarfile's own filters (Python 3.12,
# and 3.11.4 on) would refuse the absolute links a diff may hold; Debian 12's 3.11.2 has none.
TRUSTED = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def unpacking_order(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The members of a diff in the order they are unpacked, checked: files, directories and
    symlinks only; no name absolute, with ``..``, or below a symlink of the archive; symlinks
    last, so nothing is ever written through one (where a link points is data, never
    followed). Modes lose setuid, setgid and sticky bits; owners become the caller's."""
    links = {member.name.strip("/") for member in members if member.issym()}
    first: list[tarfile.TarInfo] = []
    last: list[tarfile.TarInfo] = []
    for member in members:
        parts = [part for part in member.name.split("/") if part not in ("", ".")]
        if member.name.startswith("/") or ".." in parts:
            raise ArchiveRefused(f"diff member {member.name!r}: a path outside the folder")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise ArchiveRefused(
                f"diff member {member.name!r}: only files, directories and symlinks unpack"
            )
        if any("/".join(parts[:depth]) in links for depth in range(1, len(parts))):
            raise ArchiveRefused(f"diff member {member.name!r}: below a symlink of the archive")
        member.mode &= 0o777
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        (last if member.issym() else first).append(member)
    return first + last


def unpack_diff(diff: DiffResponse, dest_dir: str | os.PathLike[str]) -> None:
    """Extract a diff's files into ``dest_dir`` (``unpacking_order`` says what is refused);
    deleted paths are in ``diff.deleted``, not acted on."""
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    content = base64.b64decode(diff.content) if diff.content else b""
    if not content:
        return
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as archive:
        extract_checked(archive, dest_dir)


def extract_checked(archive: tarfile.TarFile, dest_dir: str | os.PathLike[str]) -> None:
    members = unpacking_order(archive.getmembers())
    archive.extractall(dest_dir, members=members, **TRUSTED)  # type: ignore[arg-type]


class BaseClient:
    """What both clients share: the service's address and credentials, for each route the
    ``Call`` (method, path, body, and the model its answer becomes), and when to retry one.
    Subclasses only send."""

    def __init__(self, url: str, token: str | None = None, retries: int = RETRIES) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
        self.limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self.retries = retries

    def _retry_delay(
        self, call: Call[Any], attempt: int, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before sending ``call`` again, or None to give ``outcome`` back."""
        if attempt >= self.retries:
            return None
        backoff: float = 0.1 * 2**attempt
        if isinstance(outcome, httpx.Response):
            after = outcome.headers.get("retry-after", "")
            if outcome.status_code != 503 or not after.isdigit():
                return None
            return float(min(max(float(after), backoff), MAX_RETRY_WAIT_S))
        never_sent = isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout)
        if never_sent or (call.idempotent and not isinstance(outcome, httpx.TimeoutException)):
            return backoff
        return None

    @staticmethod
    def _finish(call: Call[T], outcome: httpx.Response | httpx.TransportError) -> T:
        if isinstance(outcome, httpx.TransportError):
            raise outcome
        return call.answer(outcome)

    def _execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None,
        timeout_s: float | None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> Call[ToolResult]:
        call = ToolCall(name=tool, arguments=arguments or {})
        if uniq_id is not None:
            call.uniq_id = uniq_id
        body = {"trajectory_id": trajectory_id, "tool": call.model_dump(), "timeout_s": timeout_s}
        if lease is not None:
            body.update(lease.model_dump(exclude_none=True))
        return Call("POST", "/execute", body, ToolResult.model_validate, idempotent=True)

    @staticmethod
    def _stream_event(line: str) -> OutputChunk | ToolResult:
        event = json.loads(line)
        if event.get("type") == "output":
            return OutputChunk.model_validate(event)
        event.pop("type", None)
        return ToolResult.model_validate(event)

    def _open_trajectory(self, trajectory_id: str, lease: LeaseOptions) -> Call[TrajectoryInfo]:
        body = {"trajectory_id": trajectory_id, **lease.model_dump(exclude_none=True)}
        # Taking a lease twice gives the same lease.
        return Call("POST", "/trajectories", body, TrajectoryInfo.model_validate, idempotent=True)

    def _cancel(self, trajectory_id: str) -> Call[CancelResponse]:
        body = {"trajectory_id": trajectory_id}
        return Call("POST", "/cancel", body, CancelResponse.model_validate, idempotent=True)

    def _release_group(self, group: str, reset_workspace: bool) -> Call[GroupReleaseResponse]:
        body = {"group": group, "reset_workspace": reset_workspace}
        return Call("POST", "/release", body, GroupReleaseResponse.model_validate)

    def _execute_batch(self, calls: list[dict[str, Any]]) -> Call[list[ToolResult]]:
        return Call("POST", "/execute_batch", {"calls": calls}, batch_results)

    def _release(self, trajectory_id: str, reset_workspace: bool) -> Call[ReleaseResponse]:
        body = {"trajectory_id": trajectory_id, "reset_workspace": reset_workspace}
        return Call("POST", "/release", body, ReleaseResponse.model_validate)

    @staticmethod
    def _artifact(
        route: str, answer: type[A], trajectory_id: str, path: str, options: dict[str, Any]
    ) -> Call[A]:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return Call("POST", f"/artifacts/{route}", body, answer.model_validate, idempotent=True)

    def _status(self) -> Call[StatusResponse]:
        return Call("GET", "/status", None, StatusResponse.model_validate, idempotent=True)

    @staticmethod
    def _upload(
        trajectory_id: str,
        archive: bytes,
        path: str,
        format: Literal["tar.gz", "file"],
        template: str | None,
        lease: LeaseOptions | None,
    ) -> Call[UploadResponse]:
        options = lease.model_copy() if lease is not None else LeaseOptions()
        if template is not None:
            options.template = template
        params = {"path": path, "format": format, **options.model_dump(exclude_none=True)}
        where = f"/trajectories/{quote(trajectory_id, safe='')}/archive"
        parse = UploadResponse.model_validate
        return Call("PUT", where, None, parse, content=archive, params=params)

    @staticmethod
    def _create_template(
        name: str, archive: bytes | None, trajectory_id: str | None
    ) -> Call[TemplateInfo]:
        if (archive is None) == (trajectory_id is None):
            raise ValueError("give exactly one of local_path, archive and trajectory_id")
        parse = TemplateInfo.model_validate
        if trajectory_id is not None:
            body = {"name": name, "trajectory_id": trajectory_id}
            return Call("POST", "/templates", body, parse)
        # Storing the same archive under the same name twice gives the same template.
        where = f"/templates/{quote(name, safe='')}"
        return Call("PUT", where, None, parse, idempotent=True, content=archive)

    @staticmethod
    def _list_templates() -> Call[list[TemplateInfo]]:
        return Call("GET", "/templates", None, template_list, idempotent=True)

    @staticmethod
    def _delete_template(name: str) -> Call[TemplateDeleteResponse]:
        where = f"/templates/{quote(name, safe='')}"
        return Call("DELETE", where, None, TemplateDeleteResponse.model_validate)

    @staticmethod
    def _fork(
        trajectory_id: str,
        new_trajectory_ids: list[str],
        group: str | None,
        lease_ttl_s: float | None,
    ) -> Call[ForkResponse]:
        body: dict[str, Any] = {
            "trajectory_id": trajectory_id,
            "new_trajectory_ids": list(new_trajectory_ids),
        }
        body.update({k: v for k, v in (("group", group), ("lease_ttl_s", lease_ttl_s)) if v})
        return Call("POST", "/fork", body, ForkResponse.model_validate)

    @staticmethod
    def _diff(trajectory_id: str) -> Call[DiffResponse]:
        body = {"trajectory_id": trajectory_id}
        return Call("POST", "/artifacts/diff", body, DiffResponse.model_validate, idempotent=True)


class ExecutorClient(BaseClient):
    """The executor's routes over a blocking ``httpx.Client``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        retries: int = RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, retries)
        self.http = httpx.Client(
            base_url=url,
            headers=self.headers,
            timeout=self.timeout,
            limits=self.limits,
            transport=transport,
        )

    def __enter__(self) -> ExecutorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, call: Call[T]) -> T:
        for attempt in itertools.count():
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self.http.request(call.method, call.path, **call.request())
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._retry_delay(call, attempt, outcome)
            if delay is None:
                break
            time.sleep(delay)
        return self._finish(call, outcome)

    def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> ToolResult:
        """Run one tool call in the trajectory's slot (leased on its first call, with
        ``lease``'s group and lifetime). Sent again with the same ``uniq_id``, it runs once."""
        return self._send(self._execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease))

    def execute_stream(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> Iterator[OutputChunk | ToolResult]:
        """``execute``, its output as the command prints it (``OutputChunk``s), then its
        ``ToolResult``. Leaving the loop early closes the stream, which cancels the call."""
        call = self._execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        with self.http.stream("POST", "/execute/stream", json=call.body) as response:
            if response.status_code >= 400:
                response.read()
                raise ExecutorError(response.status_code, error_message(response))
            for line in response.iter_lines():
                if line.strip():
                    yield self._stream_event(line)

    def open_trajectory(
        self, trajectory_id: str, lease: LeaseOptions | None = None
    ) -> TrajectoryInfo:
        """Take the trajectory's lease now, without running anything."""
        return self._send(self._open_trajectory(trajectory_id, lease or LeaseOptions()))

    def cancel(self, trajectory_id: str) -> CancelResponse:
        """Stop the trajectory's running and queued calls (their commands killed)."""
        return self._send(self._cancel(trajectory_id))

    def release_group(self, group: str, reset_workspace: bool = False) -> GroupReleaseResponse:
        """Release every trajectory of ``group``."""
        return self._send(self._release_group(group, reset_workspace))

    def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        """``calls``: ExecuteRequest dicts (``trajectory_id``, ``tool``, ``timeout_s``)."""
        return self._send(self._execute_batch(calls))

    def release(self, trajectory_id: str, reset_workspace: bool = False) -> ReleaseResponse:
        """Give the trajectory's slot back; ``reset_workspace`` wipes it first."""
        return self._send(self._release(trajectory_id, reset_workspace))

    def read_artifact(self, trajectory_id: str, path: str, **options: Any) -> ArtifactReadResponse:
        """One file of the workspace; ``options``: ``encoding``, ``max_bytes``."""
        return self._send(
            self._artifact("read", ArtifactReadResponse, trajectory_id, path, options)
        )

    def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        """Entries below ``path``; ``options``: ``recursive``, ``max_entries``."""
        return self._send(
            self._artifact("list", ArtifactListResponse, trajectory_id, path, options)
        )

    def archive_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactArchiveResponse:
        """A base64 tar.gz of ``path``; ``options``: ``format``, ``max_bytes``, ``max_entries``."""
        return self._send(
            self._artifact("archive", ArtifactArchiveResponse, trajectory_id, path, options)
        )

    def status(self) -> StatusResponse:
        """``GET /status``: queue, counters and the pool."""
        return self._send(self._status())

    def upload_dir(
        self,
        trajectory_id: str,
        local_path: str | os.PathLike[str],
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """The local folder's contents into the workspace at ``path`` (one tar.gz, one
        request). Takes the trajectory's lease when it holds none, from ``template``'s files
        if one is named, with ``lease``'s group and lifetime."""
        archive = archive_of_dir(local_path)
        return self._send(self._upload(trajectory_id, archive, path, "tar.gz", template, lease))

    def upload_file(
        self,
        trajectory_id: str,
        local_file: str | os.PathLike[str],
        path: str,
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """One local file written at ``path`` in the workspace (any size up to the cap)."""
        content = archive_of_file(local_file)
        return self._send(self._upload(trajectory_id, content, path, "file", template, lease))

    def upload_archive(
        self,
        trajectory_id: str,
        archive: bytes,
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """A tar.gz already made, extracted into the workspace at ``path``."""
        return self._send(self._upload(trajectory_id, archive, path, "tar.gz", template, lease))

    def create_template(
        self,
        name: str,
        local_path: str | os.PathLike[str] | None = None,
        archive: bytes | None = None,
        trajectory_id: str | None = None,
    ) -> TemplateInfo:
        """A template named ``name`` from one of: a local folder, a tar.gz, or the files of
        a live trajectory's workspace now. The same name again replaces its content."""
        if local_path is not None:
            if archive is not None:
                raise ValueError("give exactly one of local_path, archive and trajectory_id")
            archive = archive_of_dir(local_path)
        return self._send(self._create_template(name, archive, trajectory_id))

    def list_templates(self) -> list[TemplateInfo]:
        return self._send(self._list_templates())

    def delete_template(self, name: str) -> TemplateDeleteResponse:
        """Forget the template; trajectories running on it keep their files."""
        return self._send(self._delete_template(name))

    def fork(
        self,
        trajectory_id: str,
        new_trajectory_ids: list[str],
        group: str | None = None,
        lease_ttl_s: float | None = None,
    ) -> ForkResponse:
        """New trajectories whose workspaces start as ``trajectory_id``'s files now (its
        processes are not copied); in ``group`` (default: the source's)."""
        return self._send(self._fork(trajectory_id, new_trajectory_ids, group, lease_ttl_s))

    def diff(
        self, trajectory_id: str, dest_dir: str | os.PathLike[str] | None = None
    ) -> DiffResponse:
        """What changed since the workspace's template or fork source: the files added or
        changed (extracted into ``dest_dir`` when given) and the paths deleted
        (``.deleted``)."""
        diff = self._send(self._diff(trajectory_id))
        if dest_dir is not None and diff.success:
            unpack_diff(diff, dest_dir)
        return diff


class AsyncExecutorClient(BaseClient):
    """The executor's routes as coroutines over ``httpx.AsyncClient``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        retries: int = RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, retries)
        self.http = httpx.AsyncClient(
            base_url=url,
            headers=self.headers,
            timeout=self.timeout,
            limits=self.limits,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncExecutorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, call: Call[T]) -> T:
        for attempt in itertools.count():
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self.http.request(call.method, call.path, **call.request())
            except httpx.TransportError as exc:
                outcome = exc
            delay = self._retry_delay(call, attempt, outcome)
            if delay is None:
                break
            await asyncio.sleep(delay)
        return self._finish(call, outcome)

    async def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> ToolResult:
        """Run one tool call in the trajectory's slot (leased on its first call, with
        ``lease``'s group and lifetime). Sent again with the same ``uniq_id``, it runs once."""
        return await self._send(
            self._execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        )

    async def execute_stream(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> AsyncIterator[OutputChunk | ToolResult]:
        """``execute``, its output as the command prints it (``OutputChunk``s), then its
        ``ToolResult``. Leaving the loop early closes the stream, which cancels the call."""
        call = self._execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        async with self.http.stream("POST", "/execute/stream", json=call.body) as response:
            if response.status_code >= 400:
                await response.aread()
                raise ExecutorError(response.status_code, error_message(response))
            async for line in response.aiter_lines():
                if line.strip():
                    yield self._stream_event(line)

    async def open_trajectory(
        self, trajectory_id: str, lease: LeaseOptions | None = None
    ) -> TrajectoryInfo:
        """Take the trajectory's lease now, without running anything."""
        return await self._send(self._open_trajectory(trajectory_id, lease or LeaseOptions()))

    async def cancel(self, trajectory_id: str) -> CancelResponse:
        """Stop the trajectory's running and queued calls (their commands killed)."""
        return await self._send(self._cancel(trajectory_id))

    async def release_group(
        self, group: str, reset_workspace: bool = False
    ) -> GroupReleaseResponse:
        """Release every trajectory of ``group``."""
        return await self._send(self._release_group(group, reset_workspace))

    async def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        """``calls``: ExecuteRequest dicts (``trajectory_id``, ``tool``, ``timeout_s``)."""
        return await self._send(self._execute_batch(calls))

    async def release(self, trajectory_id: str, reset_workspace: bool = False) -> ReleaseResponse:
        """Give the trajectory's slot back; ``reset_workspace`` wipes it first."""
        return await self._send(self._release(trajectory_id, reset_workspace))

    async def read_artifact(
        self, trajectory_id: str, path: str, **options: Any
    ) -> ArtifactReadResponse:
        """One file of the workspace; ``options``: ``encoding``, ``max_bytes``."""
        return await self._send(
            self._artifact("read", ArtifactReadResponse, trajectory_id, path, options)
        )

    async def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        """Entries below ``path``; ``options``: ``recursive``, ``max_entries``."""
        return await self._send(
            self._artifact("list", ArtifactListResponse, trajectory_id, path, options)
        )

    async def archive_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactArchiveResponse:
        """A base64 tar.gz of ``path``; ``options``: ``format``, ``max_bytes``, ``max_entries``."""
        return await self._send(
            self._artifact("archive", ArtifactArchiveResponse, trajectory_id, path, options)
        )

    async def status(self) -> StatusResponse:
        """``GET /status``: queue, counters and the pool."""
        return await self._send(self._status())

    async def upload_dir(
        self,
        trajectory_id: str,
        local_path: str | os.PathLike[str],
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """The local folder's contents into the workspace at ``path`` (one tar.gz, one
        request). Takes the trajectory's lease when it holds none, from ``template``'s files
        if one is named, with ``lease``'s group and lifetime."""
        archive = await asyncio.to_thread(archive_of_dir, local_path)
        return await self._send(
            self._upload(trajectory_id, archive, path, "tar.gz", template, lease)
        )

    async def upload_file(
        self,
        trajectory_id: str,
        local_file: str | os.PathLike[str],
        path: str,
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """One local file written at ``path`` in the workspace (any size up to the cap)."""
        content = await asyncio.to_thread(archive_of_file, local_file)
        return await self._send(self._upload(trajectory_id, content, path, "file", template, lease))

    async def upload_archive(
        self,
        trajectory_id: str,
        archive: bytes,
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """A tar.gz already made, extracted into the workspace at ``path``."""
        return await self._send(
            self._upload(trajectory_id, archive, path, "tar.gz", template, lease)
        )

    async def create_template(
        self,
        name: str,
        local_path: str | os.PathLike[str] | None = None,
        archive: bytes | None = None,
        trajectory_id: str | None = None,
    ) -> TemplateInfo:
        """A template named ``name`` from one of: a local folder, a tar.gz, or the files of
        a live trajectory's workspace now. The same name again replaces its content."""
        if local_path is not None:
            if archive is not None:
                raise ValueError("give exactly one of local_path, archive and trajectory_id")
            archive = await asyncio.to_thread(archive_of_dir, local_path)
        return await self._send(self._create_template(name, archive, trajectory_id))

    async def list_templates(self) -> list[TemplateInfo]:
        return await self._send(self._list_templates())

    async def delete_template(self, name: str) -> TemplateDeleteResponse:
        """Forget the template; trajectories running on it keep their files."""
        return await self._send(self._delete_template(name))

    async def fork(
        self,
        trajectory_id: str,
        new_trajectory_ids: list[str],
        group: str | None = None,
        lease_ttl_s: float | None = None,
    ) -> ForkResponse:
        """New trajectories whose workspaces start as ``trajectory_id``'s files now (its
        processes are not copied); in ``group`` (default: the source's)."""
        return await self._send(self._fork(trajectory_id, new_trajectory_ids, group, lease_ttl_s))

    async def diff(
        self, trajectory_id: str, dest_dir: str | os.PathLike[str] | None = None
    ) -> DiffResponse:
        """What changed since the workspace's template or fork source: the files added or
        changed (extracted into ``dest_dir`` when given) and the paths deleted
        (``.deleted``)."""
        diff = await self._send(self._diff(trajectory_id))
        if dest_dir is not None and diff.success:
            await asyncio.to_thread(unpack_diff, diff, dest_dir)
        return diff
