"""The executor: trajectories, their leases, and where each call goes.

- A trajectory gets a lease on its first sandbox call and keeps its slot until ``/release``
  or idle expiry.
- Calls of one trajectory run in submission order (one lock per trajectory); different
  trajectories never wait for each other, beyond the sandbox they share.
- A trajectory whose workspace was lost (its sandbox died) or expired gets a clear error on
  every call until it is released; releasing it clears that, and its next call starts fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from atropos_agent.errors import (
    ExternalToolError,
    NoFreeSlot,
    QueueFull,
    SandboxUnavailable,
    ShuttingDown,
    TrajectoryBusy,
    UnknownTrajectory,
)
from atropos_agent.executor.external_tools import ExternalTools
from atropos_agent.executor.lease_journal import LeaseJournal
from atropos_agent.executor.leases import Lease
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.settings import CallSettings
from atropos_agent.models import (
    MAX_TIMEOUT_S,
    ArtifactArchiveRequest,
    ArtifactArchiveResponse,
    ArtifactListRequest,
    ArtifactListResponse,
    ArtifactReadRequest,
    ArtifactReadResponse,
    ReleaseResponse,
    StatusResponse,
    ToolCall,
    ToolResult,
    TrajectoriesResponse,
    TrajectoryInfo,
    effective_timeout,
)
from atropos_agent.sandbox.protocol import (
    BatchItem,
    SlotArtifactArchiveRequest,
    SlotArtifactListRequest,
    SlotArtifactReadRequest,
)
from atropos_agent.sandbox.tools import SANDBOX_TOOLS

log = logging.getLogger("atropos.executor")

# How many ended trajectories are remembered, to answer their late calls clearly.
ENDED_MEMORY = 100_000
RELEASE_WAIT_S = MAX_TIMEOUT_S + 60.0
ArtifactRequest = ArtifactReadRequest | ArtifactListRequest | ArtifactArchiveRequest
R = TypeVar("R", ArtifactReadResponse, ArtifactListResponse, ArtifactArchiveResponse)
S = TypeVar("S", SlotArtifactReadRequest, SlotArtifactListRequest, SlotArtifactArchiveRequest)


@dataclass
class Trajectory:
    trajectory_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lease: Lease | None = None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    in_flight: int = 0

    def describe(self) -> TrajectoryInfo:
        lease = self.lease
        return TrajectoryInfo(
            trajectory_id=self.trajectory_id,
            sandbox_id=lease.sandbox.sandbox_id if lease else None,
            slot_id=lease.slot_id if lease else None,
            age_s=round(time.time() - self.created, 3),
            idle_s=round(time.monotonic() - self.last_used, 3),
            calls=self.calls,
            in_flight=self.in_flight,
        )


class LatencyWindow:
    """The latest N call latencies, for percentiles in /status."""

    def __init__(self, size: int = 4096) -> None:
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def describe(self) -> dict[str, float]:
        ordered = sorted(self.samples)
        if not ordered:
            return {}

        def at(fraction: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000, 3)

        return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "samples": len(ordered)}


class Executor:
    def __init__(
        self,
        settings: CallSettings,
        pool: Pool,
        external: ExternalTools,
        journal: LeaseJournal | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.external = external
        # Which trajectories hold or held leases, for the executor started after this one.
        self.journal = journal or LeaseJournal.in_memory()
        self.trajectories: dict[str, Trajectory] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        self.in_service = 0
        self.total_requests = 0
        self.total_errors = 0
        self.latency = LatencyWindow()
        self.sweeper: asyncio.Task[None] | None = None
        # The tasks running execute(), so that a shutdown can answer them (begin_shutdown).
        self.calls_in_flight: set[asyncio.Task[object]] = set()
        self.draining = False
        self.drainer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._recall_lost_workspaces()
        await self.pool.start()
        await self.external.start()
        self.sweeper = asyncio.create_task(self._expire_idle(), name="lease-expiry")

    async def stop(self) -> None:
        if not self.journal.claimed:
            # Never started, or refused at start since an executor of the same identity runs:
            # the pool (on Nomad, its job) is that executor's. Stop nothing.
            return
        if self.drainer is not None:
            self.drainer.cancel()
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        await self.external.stop()
        await self.pool.stop()
        self.journal.close()

    def _recall_lost_workspaces(self) -> None:
        """Leases of the executor that ran before this one: their workspaces went with it
        (local sandboxes die with their executor; a Nomad sandbox's used slots are reset on
        admission), so their trajectories are told so until they are released."""
        left = self.journal.open()
        for trajectory_id in left:
            self._remember_end(
                trajectory_id,
                f"workspace lost for trajectory {trajectory_id!r}: the executor restarted, and "
                "this workspace did not survive the restart. Its files and processes are gone; "
                "release the trajectory to start over",
            )
        if left:
            log.warning("event=leases_of_previous_run count=%d", len(left))

    # ---- calls

    def admit(self, count: int = 1) -> None:
        """Count calls into the service, refusing beyond the queue bound and when stopping."""
        if self.draining:
            raise ShuttingDown("the executor is shutting down and takes no new calls; retry")
        if self.in_service + count > self.settings.max_queue:
            raise QueueFull(
                f"{self.in_service} calls in the service (limit {self.settings.max_queue}); "
                "retry shortly"
            )
        self.in_service += count

    async def execute(
        self, trajectory_id: str, tool: ToolCall, timeout_s: float | None
    ) -> ToolResult:
        """One call, already admitted; answered with a ToolResult whatever happens."""
        started = time.monotonic()
        self.total_requests += 1
        task = asyncio.current_task()
        if task is not None:
            self.calls_in_flight.add(task)
        try:
            result = await self._execute(trajectory_id, tool, timeout_s)
        except asyncio.CancelledError:
            if not (self.draining and task is not None and task.uncancel() == 0):
                raise
            result = ToolResult.failure(
                "the executor shut down while this call ran: the command was stopped and may "
                "have had part of its effect; retry it on the restarted service",
                shutting_down=True,
                retryable=True,
            )
        finally:
            self.in_service -= 1
            self.calls_in_flight.discard(task)
        result.uniq_id = tool.uniq_id
        if not result.success:
            self.total_errors += 1
        self.latency.add(time.monotonic() - started)
        return result

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no new calls; answer those still running after ``grace_s`` with a clear,
        retryable failure (so that the server's own wait for them ends in a bound)."""
        if self.draining:
            return
        self.draining = True
        count = len(self.calls_in_flight)
        log.info("event=shutdown_begun calls_in_flight=%d grace_s=%g", count, grace_s)
        self.drainer = asyncio.get_running_loop().call_later(grace_s, self._end_calls_in_flight)

    def _end_calls_in_flight(self) -> None:
        if self.calls_in_flight:
            log.warning("event=calls_ended_by_shutdown count=%d", len(self.calls_in_flight))
        for task in list(self.calls_in_flight):
            task.cancel("executor shutting down")

    async def _execute(
        self, trajectory_id: str, tool: ToolCall, timeout_s: float | None
    ) -> ToolResult:
        timeout = effective_timeout(timeout_s, tool.arguments.get("timeout"))
        is_sandbox = tool.name in SANDBOX_TOOLS
        if not is_sandbox and not self.external.has(tool.name):
            known = sorted(SANDBOX_TOOLS | self.external.names())
            return ToolResult.failure(
                f"unknown tool {tool.name!r}; available tools: {', '.join(known)}"
            )
        while True:
            trajectory = self.trajectories.get(trajectory_id)
            if trajectory is None:
                trajectory = self.trajectories[trajectory_id] = Trajectory(trajectory_id)
            trajectory.in_flight += 1
            try:
                async with trajectory.lock:
                    if self.trajectories.get(trajectory_id) is not trajectory:
                        # Released while this call waited behind the release: run it on the
                        # trajectory as it is now, not on the released object (a lease taken
                        # there could never be seen, released or expired).
                        continue
                    trajectory.calls += 1
                    if is_sandbox:
                        return await self._sandbox_call(trajectory, tool, timeout)
                    return await self._external_call(trajectory_id, tool, timeout)
            finally:
                trajectory.in_flight -= 1
                trajectory.last_used = time.monotonic()

    async def _sandbox_call(
        self, trajectory: Trajectory, tool: ToolCall, timeout: float
    ) -> ToolResult:
        ended = self.ended.get(trajectory.trajectory_id)
        if ended is not None:
            return ToolResult.failure(ended, workspace_lost=True)
        if trajectory.lease is None:
            try:
                trajectory.lease = await self.pool.acquire(
                    trajectory.trajectory_id, self.settings.acquire_timeout_s
                )
            except NoFreeSlot as exc:
                return ToolResult.failure(exc.message, acquire_timeout=True)
            self.journal.record(
                trajectory.trajectory_id,
                trajectory.lease.sandbox.sandbox_id,
                trajectory.lease.slot_id,
            )
        lease = trajectory.lease
        if lease.lost:
            return self._lose(trajectory, "its sandbox stopped")
        item = BatchItem(
            slot_id=lease.slot_id,
            tool=tool.name,
            args=tool.arguments,
            uniq_id=tool.uniq_id,
            timeout=timeout,
        )
        try:
            answer = await lease.sandbox.batcher.submit(item)
        except SandboxUnavailable as exc:
            # The failed call is one strike; a failed health check now is the second.
            await self.pool.probe(lease.sandbox, failures_to_retire=1)
            if lease.lost:
                return self._lose(
                    trajectory, f"its sandbox stopped during this call ({exc.message})"
                )
            return ToolResult.failure(
                f"sandbox {lease.sandbox.sandbox_id} did not answer: {exc.message}"
            )
        metadata = answer.metadata
        metadata.update(sandbox_id=lease.sandbox.sandbox_id, slot_id=lease.slot_id)
        return ToolResult(
            success=answer.success, output=answer.output, error=answer.error, metadata=metadata
        )

    def _lose(self, trajectory: Trajectory, why: str) -> ToolResult:
        message = (
            f"workspace lost for trajectory {trajectory.trajectory_id!r}: {why}. Its "
            "files and processes are gone; release the trajectory to start over"
        )
        self._end(trajectory, message)
        return ToolResult.failure(message, workspace_lost=True)

    def _end(self, trajectory: Trajectory, message: str) -> None:
        if trajectory.lease is not None:
            self.pool.release(trajectory.lease)
            trajectory.lease = None
        self._remember_end(trajectory.trajectory_id, message)

    def _remember_end(self, trajectory_id: str, message: str) -> None:
        self.ended[trajectory_id] = message
        self.ended.move_to_end(trajectory_id)
        while len(self.ended) > ENDED_MEMORY:
            forgotten, _ = self.ended.popitem(last=False)
            self.journal.forget(forgotten)

    async def _external_call(
        self, trajectory_id: str, tool: ToolCall, timeout: float
    ) -> ToolResult:
        try:
            return await self.external.execute(trajectory_id, tool, timeout)
        except ExternalToolError as exc:
            return ToolResult.failure(exc.message)

    # ---- release and expiry

    async def release(self, trajectory_id: str, reset_workspace: bool) -> ReleaseResponse:
        """Waits for a running call of the trajectory, then frees its slot.

        The slot is always reset before another trajectory gets it; ``reset_workspace`` only
        decides whether the answer waits for that reset.
        """
        trajectory = self.trajectories.get(trajectory_id)
        if trajectory is None:
            if self.ended.pop(trajectory_id, None) is not None:
                self.journal.forget(trajectory_id)
                return ReleaseResponse(released=False, note="lease had already ended")
            raise UnknownTrajectory(f"unknown trajectory {trajectory_id!r}: it holds no lease")
        try:
            await asyncio.wait_for(trajectory.lock.acquire(), RELEASE_WAIT_S)
        except TimeoutError:
            raise TrajectoryBusy(
                f"trajectory {trajectory_id!r} still has a call running after "
                f"{RELEASE_WAIT_S:g}s; retry the release"
            ) from None
        try:
            lease, trajectory.lease = trajectory.lease, None
            if self.trajectories.get(trajectory_id) is trajectory:
                del self.trajectories[trajectory_id]
            ended = self.ended.pop(trajectory_id, None)
            self.journal.forget(trajectory_id)
            if lease is not None:
                reset = self.pool.release(lease)
                if reset_workspace:
                    await reset
        finally:
            trajectory.lock.release()
        note = None if ended is None else "lease had already ended"
        return ReleaseResponse(released=lease is not None, note=note)

    async def _expire_idle(self) -> None:
        expiry = self.settings.lease_idle_expiry_s
        while True:
            await asyncio.sleep(min(max(expiry / 4, 0.05), 5.0))
            cutoff = time.monotonic() - expiry
            for trajectory in list(self.trajectories.values()):
                if trajectory.in_flight or trajectory.lock.locked():
                    continue
                if trajectory.last_used > cutoff:
                    continue
                del self.trajectories[trajectory.trajectory_id]
                if trajectory.lease is not None:
                    log.info(
                        "event=lease_expired trajectory=%s slot=%s",
                        trajectory.trajectory_id,
                        trajectory.lease.slot_id,
                    )
                    self._end(
                        trajectory,
                        (
                            f"lease of trajectory {trajectory.trajectory_id!r} expired after "
                            f"{expiry:g}s idle; its workspace was reset. Release the trajectory "
                            "to start over"
                        ),
                    )

    # ---- artifacts

    async def read_artifact(self, request: ArtifactReadRequest) -> ArtifactReadResponse:
        client = SandboxClient.read_artifact
        return await self._on_slot(request, SlotArtifactReadRequest, client, ArtifactReadResponse)

    async def list_artifacts(self, request: ArtifactListRequest) -> ArtifactListResponse:
        client = SandboxClient.list_artifacts
        return await self._on_slot(request, SlotArtifactListRequest, client, ArtifactListResponse)

    async def archive_artifacts(self, request: ArtifactArchiveRequest) -> ArtifactArchiveResponse:
        client = SandboxClient.archive_artifacts
        answer = ArtifactArchiveResponse
        return await self._on_slot(request, SlotArtifactArchiveRequest, client, answer)

    async def _on_slot(
        self,
        request: ArtifactRequest,
        slot_request: type[S],
        send: Callable[[SandboxClient, S], Awaitable[R]],
        answer: type[R],
    ) -> R:
        """Send the request, keyed by the trajectory's slot, in order with its calls.

        As the old service did, a trajectory that holds no slot gets the route's own shape with
        ``success: false`` (HTTP 200), and so does one whose sandbox does not answer.
        """
        trajectory_id = request.trajectory_id
        trajectory = self.trajectories.get(trajectory_id)
        if trajectory is None or trajectory.lease is None:
            ended = self.ended.get(trajectory_id)
            return answer(
                success=False,
                error=ended
                or f"No active slot for trajectory {trajectory_id!r}: make a sandbox call first",
            )
        async with trajectory.lock:
            lease = trajectory.lease
            if lease is None or lease.lost:
                return answer(
                    success=False, error=f"workspace lost for trajectory {trajectory_id!r}"
                )
            trajectory.last_used = time.monotonic()
            fields = request.model_dump(exclude={"trajectory_id"})
            try:
                return await send(
                    lease.sandbox.client, slot_request(slot_id=lease.slot_id, **fields)
                )
            except SandboxUnavailable as exc:
                return answer(success=False, error=f"sandbox did not answer: {exc.message}")

    # ---- reporting

    def describe_trajectories(self, offset: int, limit: int) -> TrajectoriesResponse:
        ordered = sorted(self.trajectories.values(), key=lambda t: t.created)
        page = ordered[offset : offset + limit]
        return TrajectoriesResponse(
            total=len(ordered),
            offset=offset,
            limit=limit,
            trajectories=[t.describe() for t in page],
        )

    def status(self) -> StatusResponse:
        return StatusResponse(
            queue_size=self.in_service,
            total_requests=self.total_requests,
            total_errors=self.total_errors,
            pool=self.pool.describe(),
            leases=sum(1 for t in self.trajectories.values() if t.lease is not None),
            trajectories=len(self.trajectories),
            latency=self.latency.describe(),
            max_queue=self.settings.max_queue,
            external_tools=self.external.describe(),
        )
