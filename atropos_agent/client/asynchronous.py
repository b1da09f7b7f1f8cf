"""``AsyncExecutorClient``: the executor's routes as coroutines, over one or several executors.

Each method builds its ``Call`` (``routes.py``), picks the executor (``routing.py``), and sends
it with the retries the package docstring describes. Calls that concern no single trajectory
fan out: templates are stored on every executor, a group is released on every one, a batch is
split per executor and its answers put back in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Any, Literal, TypeVar

from atropos_agent.client import routes
from atropos_agent.client.archives import archive_of_dir, archive_of_file, unpack_diff
from atropos_agent.client.discovery import (
    DEFAULT_NOMAD_ADDRESS,
    DEFAULT_SERVICE,
    NOMAD_READ_TIMEOUT_S,
    NomadServices,
)
from atropos_agent.client.routes import READ_TIMEOUT_S, RETRIES, Call, retry_delay
from atropos_agent.client.routing import Router, pinned_down
from atropos_agent.client.transport import CONNECT_TIMEOUT_S, AiohttpTransport, Transport
from atropos_agent.errors import ExecutorError, ExecutorUnreachable
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
# The longest a call waits for the first list of executors from Nomad.
DISCOVERY_WAIT_S = NOMAD_READ_TIMEOUT_S + CONNECT_TIMEOUT_S


async def settled(awaitables: Sequence[Awaitable[T]]) -> list[T | BaseException]:
    """Every result or failure, once all are done (a failure does not abandon the others)."""
    return await asyncio.gather(*awaitables, return_exceptions=True)


def first_failure(outcomes: Sequence[object]) -> BaseException | None:
    return next((o for o in outcomes if isinstance(o, BaseException)), None)


class AsyncExecutorClient:
    """The executor's routes as coroutines; ``url`` is one executor or a list of them."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        retries: int = RETRIES,
        transport: Transport | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give at least one executor URL (or use from_nomad)")
        self._setup(urls, token, retries, transport, read_timeout_s, None)

    def _setup(
        self,
        urls: list[str],
        token: str | None,
        retries: int,
        transport: Transport | None,
        read_timeout_s: float,
        discovery: NomadServices | None,
    ) -> None:
        self.router = Router(urls)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.read_timeout_s = read_timeout_s
        self.transport = transport or AiohttpTransport()
        self.discovery = discovery
        self.closed = False
        # Discovery: when to ask Nomad next, the one request in flight, its last failure.
        self._next_discovery = 0.0
        self._discovering: asyncio.Task[None] | None = None
        self._discovery_error: ExecutorError | None = None

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
    ) -> AsyncExecutorClient:
        """A client of every executor registered as ``service`` in Nomad (native service
        discovery), asked again every ``refresh_s`` and when an executor cannot be reached.
        ``kwargs``: the constructor's other options. Nomad is first asked on the first call."""
        client = cls.__new__(cls)
        discovery = NomadServices(service, nomad_address, nomad_token, namespace, refresh_s)
        client._setup(
            [],
            token,
            kwargs.pop("retries", RETRIES),
            kwargs.pop("transport", None),
            kwargs.pop("read_timeout_s", READ_TIMEOUT_S),
            discovery,
        )
        if kwargs:
            raise TypeError(f"unknown options: {sorted(kwargs)}")
        return client

    @property
    def urls(self) -> list[str]:
        """The executors new trajectories go to (as last discovered)."""
        return list(self.router.urls)

    async def __aenter__(self) -> AsyncExecutorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._discovering is not None:
            self._discovering.cancel()
            self._discovering = None
        await self.transport.close()
        self.closed = True

    # ---- where calls go

    async def _executors(self) -> list[str]:
        """The executor set, asking Nomad when it is due (waiting only when none is known)."""
        if self.discovery is not None:
            if time.monotonic() >= self._next_discovery and self._discovering is None:
                self._discovering = asyncio.create_task(self._discover(self.discovery))
            if not self.router.urls and self._discovering is not None:
                await asyncio.wait_for(asyncio.shield(self._discovering), DISCOVERY_WAIT_S)
            if not self.router.urls:
                why = f": {self._discovery_error.message}" if self._discovery_error else ""
                raise ExecutorUnreachable(
                    self.discovery.nomad_address,
                    f"no executor is registered in Nomad as {self.discovery}{why}",
                    sent=False,
                )
        return self.router.urls

    async def _discover(self, discovery: NomadServices) -> None:
        try:
            answer = await self.transport.request(discovery.request())
            self.router.set_urls(discovery.urls_of(answer))
            self._discovery_error = None
        except ExecutorError as exc:  # the last set known stays
            self._discovery_error = exc
        finally:
            self._next_discovery = time.monotonic() + discovery.refresh_s
            self._discovering = None

    def _mark_down(self, url: str) -> None:
        self.router.mark_down(url)
        self._next_discovery = 0.0  # the set may have changed: ask Nomad on the next call

    async def _route(self, call: Call[Any]) -> str:
        await self._executors()
        if call.trajectory_id is None:
            return self.router.up()[0]
        return self.router.choose(call.trajectory_id)

    def _pin(self, call: Call[Any], url: str) -> None:
        if call.leases and call.trajectory_id is not None:
            self.router.pin(call.trajectory_id, url, call.group)

    def _unreachable(self, call: Call[Any], url: str, exc: ExecutorUnreachable) -> ExecutorError:
        """``exc``, or for a trajectory pinned to ``url``, the error that says why its call
        goes nowhere else."""
        pinned = call.trajectory_id is not None and self.router.pins.get(call.trajectory_id)
        if pinned == url and not exc.sent:
            return pinned_down(call.trajectory_id or "", url, exc.message)
        return exc

    async def _send(self, call: Call[T], url: str | None = None) -> T:
        """Send ``call`` to ``url`` (default: where it routes), with retries. A new trajectory
        whose executor refuses the connection goes to its next choice."""
        movable = url is None and (
            call.trajectory_id is None or call.trajectory_id not in self.router.pins
        )
        url = url or await self._route(call)
        attempt = 0
        while True:
            try:
                request = call.request(url, self.headers, self.read_timeout_s)
                answer = await self.transport.request(request)
            except ExecutorUnreachable as exc:
                if not exc.sent:
                    self._mark_down(url)
                    if movable:
                        other = await self._route(call)
                        if other != url:
                            url = other
                            continue
                else:
                    self._pin(call, url)
                delay = retry_delay(call, attempt, self.retries, exc)
                if delay is None:
                    raise self._unreachable(call, url, exc) from None
            else:
                self._pin(call, url)
                delay = retry_delay(call, attempt, self.retries, answer)
                if delay is None:
                    return call.answer(answer)
            attempt += 1
            await asyncio.sleep(delay)

    async def _everywhere(self, call: Call[T]) -> dict[str, T | BaseException]:
        """``call`` sent to every executor (those of the set, and those holding pinned
        trajectories), concurrently."""
        urls = list(dict.fromkeys([*await self._executors(), *self.router.pins.values()]))
        outcomes = await settled([self._send(call, url) for url in urls])
        return dict(zip(urls, outcomes, strict=True))

    async def executor_for(self, trajectory_id: str) -> str:
        """The URL of the executor the trajectory's calls go to."""
        await self._executors()
        return self.router.where(trajectory_id)

    # ---- the routes

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
            routes.execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        )

    async def execute_stream(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        uniq_id: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> AsyncGenerator[OutputChunk | ToolResult, None]:
        """``execute``, its output as the command prints it (``OutputChunk``s), then its
        ``ToolResult``. Leaving the loop early closes the stream, which cancels the call."""
        call = routes.execute(trajectory_id, tool, arguments, timeout_s, uniq_id, lease)
        call = dataclasses.replace(call, path="/execute/stream", idempotent=False)
        movable = trajectory_id not in self.router.pins
        url = await self._route(call)
        while True:
            try:
                request = call.request(url, self.headers, self.read_timeout_s)
                async with self.transport.stream(request) as answer:
                    self._pin(call, url)
                    if answer.status >= 400:
                        raise ExecutorError(
                            answer.status, routes.error_message(await answer.read())
                        )
                    async for line in answer.lines():
                        if line.strip():
                            yield routes.stream_event(line)
                return
            except ExecutorUnreachable as exc:
                if exc.sent:
                    self._pin(call, url)
                else:
                    self._mark_down(url)
                    other = await self._route(call) if movable else url
                    if other != url:
                        url = other
                        continue
                raise self._unreachable(call, url, exc) from None

    async def open_trajectory(
        self, trajectory_id: str, lease: LeaseOptions | None = None
    ) -> TrajectoryInfo:
        """Take the trajectory's lease now, without running anything."""
        return await self._send(routes.open_trajectory(trajectory_id, lease or LeaseOptions()))

    async def cancel(self, trajectory_id: str) -> CancelResponse:
        """Stop the trajectory's running and queued calls (their commands killed)."""
        return await self._send(routes.cancel(trajectory_id))

    async def release_group(
        self, group: str, reset_workspace: bool = False
    ) -> GroupReleaseResponse:
        """Release every trajectory of ``group``, on every executor."""
        outcomes = await self._everywhere(routes.release_group(group, reset_workspace))
        self.router.unpin_group(group)
        failure = first_failure(list(outcomes.values()))
        if failure is not None:
            raise failure
        answers = [o for o in outcomes.values() if isinstance(o, GroupReleaseResponse)]
        return GroupReleaseResponse(group=group, released=sum(a.released for a in answers))

    async def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        """``calls``: ExecuteRequest dicts (``trajectory_id``, ``tool``, ``timeout_s``). With
        several executors, each gets its trajectories' calls, at once; if one part fails, its
        error is raised (the other parts ran)."""
        await self._executors()
        parts: dict[str, list[int]] = {}
        for index, item in enumerate(calls):
            parts.setdefault(self.router.choose(item["trajectory_id"]), []).append(index)
        urls = list(parts)
        outcomes = await settled(
            [self._send(routes.execute_batch([calls[i] for i in parts[url]]), url) for url in urls]
        )
        results: list[ToolResult | None] = [None] * len(calls)
        for url, outcome in zip(urls, outcomes, strict=True):
            reached = not isinstance(outcome, ExecutorUnreachable) or outcome.sent
            if reached:  # a call that reached the executor may have taken its lease
                for index in parts[url]:
                    self.router.pin(calls[index]["trajectory_id"], url, calls[index].get("group"))
            if isinstance(outcome, list):
                for index, result in zip(parts[url], outcome, strict=True):
                    results[index] = result
        failure = first_failure(outcomes)
        if failure is not None:
            raise failure
        return [result for result in results if result is not None]

    async def release(self, trajectory_id: str, reset_workspace: bool = False) -> ReleaseResponse:
        """Give the trajectory's slot back; ``reset_workspace`` wipes it first."""
        try:
            answer = await self._send(routes.release(trajectory_id, reset_workspace))
        except ExecutorUnreachable:
            raise
        except ExecutorError as exc:
            if exc.status == 404:  # nothing of it there: nothing to keep it pinned for
                self.router.unpin(trajectory_id)
            raise
        self.router.unpin(trajectory_id)
        return answer

    async def read_artifact(
        self, trajectory_id: str, path: str, **options: Any
    ) -> ArtifactReadResponse:
        """One file of the workspace; ``options``: ``encoding``, ``max_bytes``."""
        return await self._send(
            routes.artifact("read", ArtifactReadResponse, trajectory_id, path, options)
        )

    async def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        """Entries below ``path``; ``options``: ``recursive``, ``max_entries``."""
        return await self._send(
            routes.artifact("list", ArtifactListResponse, trajectory_id, path, options)
        )

    async def archive_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactArchiveResponse:
        """A base64 tar.gz of ``path``; ``options``: ``format``, ``max_bytes``, ``max_entries``."""
        return await self._send(
            routes.artifact("archive", ArtifactArchiveResponse, trajectory_id, path, options)
        )

    async def status(self) -> StatusResponse:
        """``GET /status`` of the executor (with several: of the first that answers;
        ``statuses`` has them all)."""
        return await self._first_answer(routes.status())

    async def statuses(self) -> dict[str, StatusResponse]:
        """``GET /status`` of every executor that answers, by URL."""
        outcomes = await self._everywhere(routes.status())
        answers = {u: o for u, o in outcomes.items() if isinstance(o, StatusResponse)}
        failure = first_failure(list(outcomes.values()))
        if not answers and failure is not None:
            raise failure
        return answers

    async def _first_answer(self, call: Call[T]) -> T:
        await self._executors()
        failure: ExecutorError | None = None
        for url in self.router.up():
            try:
                return await self._send(call, url)
            except ExecutorUnreachable as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    async def _upload(
        self,
        trajectory_id: str,
        archive: bytes,
        path: str,
        format: Literal["tar.gz", "file"],
        template: str | None,
        lease: LeaseOptions | None,
    ) -> UploadResponse:
        return await self._send(
            routes.upload(trajectory_id, archive, path, format, template, lease)
        )

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
        return await self._upload(trajectory_id, archive, path, "tar.gz", template, lease)

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
        return await self._upload(trajectory_id, content, path, "file", template, lease)

    async def upload_archive(
        self,
        trajectory_id: str,
        archive: bytes,
        path: str = ".",
        template: str | None = None,
        lease: LeaseOptions | None = None,
    ) -> UploadResponse:
        """A tar.gz already made, extracted into the workspace at ``path``."""
        return await self._upload(trajectory_id, archive, path, "tar.gz", template, lease)

    async def create_template(
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
        if local_path is not None:
            if archive is not None:
                raise ValueError("give exactly one of local_path, archive and trajectory_id")
            archive = await asyncio.to_thread(archive_of_dir, local_path)
        call = routes.create_template(name, archive, trajectory_id)
        if trajectory_id is not None:
            return await self._send(call)
        outcomes = list((await self._everywhere(call)).values())
        failure = first_failure(outcomes)
        if failure is not None:
            raise failure
        return next(o for o in outcomes if isinstance(o, TemplateInfo))

    async def list_templates(self) -> list[TemplateInfo]:
        """The templates of the first executor that answers."""
        return await self._first_answer(routes.list_templates())

    async def delete_template(self, name: str) -> TemplateDeleteResponse:
        """Forget the template (on every executor); trajectories running on it keep their
        files."""
        outcomes = list((await self._everywhere(routes.delete_template(name))).values())
        answers = [o for o in outcomes if isinstance(o, TemplateDeleteResponse)]
        # An executor that never had it (a template made from one of its trajectories) is fine.
        failures = [
            o
            for o in outcomes
            if isinstance(o, BaseException)
            and not (answers and isinstance(o, ExecutorError) and o.status == 404)
        ]
        if failures:
            raise failures[0]
        return answers[0]

    async def fork(
        self,
        trajectory_id: str,
        new_trajectory_ids: list[str],
        group: str | None = None,
        lease_ttl_s: float | None = None,
    ) -> ForkResponse:
        """New trajectories whose workspaces start as ``trajectory_id``'s files now (its
        processes are not copied); in ``group`` (default: the source's). They live on the
        source's executor."""
        call = routes.fork(trajectory_id, new_trajectory_ids, group, lease_ttl_s)
        url = await self._route(call)
        group = group or self.router.groups.get(trajectory_id)
        try:
            answer = await self._send(call, url)
        except ExecutorUnreachable as exc:
            if exc.sent:
                for new_id in new_trajectory_ids:
                    self.router.pin(new_id, url, group)
            raise
        for new_id in new_trajectory_ids:
            self.router.pin(new_id, url, group)
        return answer

    async def diff(
        self, trajectory_id: str, dest_dir: str | os.PathLike[str] | None = None
    ) -> DiffResponse:
        """What changed since the workspace's template or fork source: the files added or
        changed (extracted into ``dest_dir`` when given) and the paths deleted
        (``.deleted``)."""
        diff = await self._send(routes.diff(trajectory_id))
        if dest_dir is not None and diff.success:
            await asyncio.to_thread(unpack_diff, diff, dest_dir)
        return diff
