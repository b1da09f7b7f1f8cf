"""``ExecutorClient``: the same methods as ``AsyncExecutorClient``, blocking, from any thread.

Each client runs an ``AsyncExecutorClient`` on an event loop of its own, in a thread of its
own; a method hands its coroutine to that loop and waits for the answer. Any number of
threads may call one client at once: they share its connections and its routing (pins, the
executor set), which only the loop's thread touches. Costs the caller about what the async
client costs, plus one hand-off between threads per call (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from atropos_agent.client.asynchronous import AsyncExecutorClient
from atropos_agent.client.discovery import DEFAULT_NOMAD_ADDRESS, DEFAULT_SERVICE
from atropos_agent.client.routes import MAX_RETRY_WAIT_S, READ_TIMEOUT_S, RETRIES
from atropos_agent.client.transport import CONNECT_TIMEOUT_S, Transport
from atropos_agent.models import (
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    CancelResponse,
    DiffResponse,
    ForkResponse,
    GroupReleaseResponse,
    LeaseOptions,
    OutputChunk,
    ReleaseResponse,
    StatusResponse,
    TemplateDeleteResponse,
    TemplateInfo,
    ToolResult,
    TrajectoryInfo,
    UploadResponse,
)

T = TypeVar("T")
STOP_TIMEOUT_S = 10.0


class LoopThread:
    """An event loop running in a daemon thread of its own, until ``stop``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="atropos-executor-client", daemon=True
        )
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"no answer from the client's event loop in {timeout_s:g}s"
            ) from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()


async def next_of(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class ExecutorClient:
    """The executor's routes as blocking methods; ``url`` is one executor or a list."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        retries: int = RETRIES,
        transport: Transport | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._start(AsyncExecutorClient(url, token, retries, transport, read_timeout_s))

    def _start(self, core: AsyncExecutorClient) -> None:
        self.core = core
        self.closed = False
        self._loop = LoopThread()
        # Every call's own timeouts end it sooner; this bounds the wait if one did not.
        attempt_s = CONNECT_TIMEOUT_S + core.read_timeout_s + MAX_RETRY_WAIT_S
        self._wait_s = attempt_s * (core.retries + 1) + CONNECT_TIMEOUT_S

    @classmethod
    def from_nomad(
        cls,
        service: str = DEFAULT_SERVICE,
        nomad_address: str = DEFAULT_NOMAD_ADDRESS,
        nomad_token: str | None = None,
        namespace: str = "default",
        token: str | None = None,
        refresh_s: float = 10.0,
        **kwargs: Any,
    ) -> ExecutorClient:
        """A client of every executor registered as ``service`` in Nomad (native service
        discovery), asked again every ``refresh_s`` and when an executor cannot be reached.
        ``kwargs``: the constructor's other options. Nomad is first asked on the first call."""
        client = cls.__new__(cls)
        client._start(
            AsyncExecutorClient.from_nomad(
                service, nomad_address, nomad_token, namespace, token, refresh_s, **kwargs
            )
        )
        return client

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coroutine, self._wait_s)

    @property
    def urls(self) -> list[str]:
        """The executors new trajectories go to (as last discovered)."""
        return self.core.urls

    def __enter__(self) -> ExecutorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self._run(self.core.close())
            self._loop.stop()
            self.closed = True

    def executor_for(self, trajectory_id: str) -> str:
        """The URL of the executor the trajectory's calls go to."""
        return self._run(self.core.executor_for(trajectory_id))

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
        return self._run(
            self.core.execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        )

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
        events = self.core.execute_stream(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        try:
            while True:
                try:
                    event = self._run(next_of(events))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            self._run(events.aclose())

    def open_trajectory(
        self, trajectory_id: str, lease: LeaseOptions | None = None
    ) -> TrajectoryInfo:
        """Take the trajectory's lease now, without running anything."""
        return self._run(self.core.open_trajectory(trajectory_id, lease))

    def cancel(self, trajectory_id: str) -> CancelResponse:
        """Stop the trajectory's running and queued calls (their commands killed)."""
        return self._run(self.core.cancel(trajectory_id))

    def release_group(self, group: str, reset_workspace: bool = False) -> GroupReleaseResponse:
        """Release every trajectory of ``group``, on every executor."""
        return self._run(self.core.release_group(group, reset_workspace))

    def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        """``calls``: ExecuteRequest dicts (``trajectory_id``, ``tool``, ``timeout_s``). With
        several executors, each gets its trajectories' calls, at once; if one part fails, its
        error is raised (the other parts ran)."""
        return self._run(self.core.execute_batch(calls))

    def release(self, trajectory_id: str, reset_workspace: bool = False) -> ReleaseResponse:
        """Give the trajectory's slot back; ``reset_workspace`` wipes it first."""
        return self._run(self.core.release(trajectory_id, reset_workspace))

    def read_artifact(self, trajectory_id: str, path: str, **options: Any) -> ArtifactReadResponse:
        """One file of the workspace; ``options``: ``encoding``, ``max_bytes``."""
        return self._run(self.core.read_artifact(trajectory_id, path, **options))

    def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        """Entries below ``path``; ``options``: ``recursive``, ``max_entries``."""
        return self._run(self.core.list_artifacts(trajectory_id, path, **options))

    def archive_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactArchiveResponse:
        """A base64 tar.gz of ``path``; ``options``: ``format``, ``max_bytes``, ``max_entries``."""
        return self._run(self.core.archive_artifacts(trajectory_id, path, **options))

    def status(self) -> StatusResponse:
        """``GET /status`` of the executor (with several: of the first that answers;
        ``statuses`` has them all)."""
        return self._run(self.core.status())

    def statuses(self) -> dict[str, StatusResponse]:
        """``GET /status`` of every executor that answers, by URL."""
        return self._run(self.core.statuses())

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
        return self._run(self.core.upload_dir(trajectory_id, local_path, path, template, lease))

    def upload_file(
        self,
        trajectory_id: str,
        local_file: str | os.PathLike[str],
        path: str,
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """One local file written at ``path`` in the workspace (any size up to the cap)."""
        return self._run(self.core.upload_file(trajectory_id, local_file, path, template, lease))

    def upload_archive(
        self,
        trajectory_id: str,
        archive: bytes,
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """A tar.gz already made, extracted into the workspace at ``path``."""
        return self._run(self.core.upload_archive(trajectory_id, archive, path, template, lease))

    def create_template(
        self,
        name: str,
        local_path: str | os.PathLike[str] | None = None,
        archive: bytes | None = None,
        trajectory_id: str | None = None,
    ) -> TemplateInfo:
        """A template named ``name`` from one of: a local folder, a tar.gz, or the files of
        a live trajectory's workspace now. The same name again replaces its content. From a
        folder or a tar.gz it is stored on every executor; from a trajectory, on its
        executor only."""
        return self._run(self.core.create_template(name, local_path, archive, trajectory_id))

    def list_templates(self) -> list[TemplateInfo]:
        """The templates of the first executor that answers."""
        return self._run(self.core.list_templates())

    def delete_template(self, name: str) -> TemplateDeleteResponse:
        """Forget the template (on every executor); trajectories running on it keep their
        files."""
        return self._run(self.core.delete_template(name))

    def fork(
        self,
        trajectory_id: str,
        new_trajectory_ids: list[str],
        group: str | None = None,
        lease_ttl_s: float | None = None,
    ) -> ForkResponse:
        """New trajectories whose workspaces start as ``trajectory_id``'s files now (its
        processes are not copied); in ``group`` (default: the source's). They live on the
        source's executor."""
        return self._run(self.core.fork(trajectory_id, new_trajectory_ids, group, lease_ttl_s))

    def diff(
        self, trajectory_id: str, dest_dir: str | os.PathLike[str] | None = None
    ) -> DiffResponse:
        """What changed since the workspace's template or fork source: the files added or
        changed (extracted into ``dest_dir`` when given) and the paths deleted
        (``.deleted``)."""
        return self._run(self.core.diff(trajectory_id, dest_dir))
