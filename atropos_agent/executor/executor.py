"""The executor: trajectories, their leases, and where each call goes.

- A trajectory gets a lease on its first sandbox call and keeps its slot until ``/release``
  or idle expiry.
- Calls of one trajectory run in submission order (one lock per trajectory); different
  trajectories never wait for each other, beyond the sandbox they share.
- A trajectory whose workspace was lost (its sandbox died) or expired gets a clear error on
  every call until it is released; releasing it clears that, and its next call starts fresh.
- A call retried with its ``uniq_id`` runs once (``replays.py``); a call can be cancelled
  (``POST /cancel``, or its client going away), which kills its command in the sandbox.
- Every failed result says its ``error_kind`` and whether a retry can help (``error_kinds.py``).
- A lease may start from a template's files (``shipping.py``); naming another template than
  the one the lease was made from is refused. Uploads, forks and diffs (``workspaces.py``)
  run in order with the trajectory's calls through ``leased``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from atropos_agent.errors import (
    ExternalToolError,
    NoFreeSlot,
    QueueFull,
    RequestRefused,
    SandboxUnavailable,
    ShuttingDown,
    TrajectoryBusy,
    UnknownTemplate,
    UnknownTrajectory,
    WorkspaceConflict,
    WorkspaceGone,
)
from atropos_agent.executor import error_kinds
from atropos_agent.executor.call_tasks import SHUTDOWN, CallTasks
from atropos_agent.executor.external_tools import ExternalTools
from atropos_agent.executor.lease_journal import LeaseJournal
from atropos_agent.executor.leases import Lease
from atropos_agent.executor.metrics import ExecutorMetrics, PoolState, tool_label
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.replays import Key, ReplayLimits, Replays, digest_of, replayed
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.settings import CallSettings
from atropos_agent.executor.shipping import Shipping
from atropos_agent.executor.templates import Template
from atropos_agent.executor.trajectories import (
    Ending,
    LatencyWindow,
    RecentErrors,
    Trajectory,
    ended_result,
)
from atropos_agent.models import (
    MAX_TIMEOUT_S,
    ArtifactArchiveRequest,
    ArtifactArchiveResponse,
    ArtifactListRequest,
    ArtifactListResponse,
    ArtifactReadRequest,
    ArtifactReadResponse,
    CancelResponse,
    GroupReleaseResponse,
    LeaseOptions,
    ReleaseResponse,
    StatusResponse,
    ToolCall,
    ToolResult,
    TrajectoriesResponse,
    TrajectoryInfo,
    effective_timeout,
)
from atropos_agent.sandbox.protocol import (
    CANCEL_AND_OWNER_VERSION,
    STREAM_VERSION,
    BatchItem,
    BatchResult,
    OutputEvent,
    SlotArtifactArchiveRequest,
    SlotArtifactListRequest,
    SlotArtifactReadRequest,
    SlotLease,
)
from atropos_agent.sandbox.tools import SANDBOX_TOOLS

log = logging.getLogger("atropos.executor")

# How many ended trajectories are remembered, to answer their late calls clearly.
ENDED_MEMORY = 100_000
RELEASE_WAIT_S = MAX_TIMEOUT_S + 60.0
# How long a cancelled command is chased in its sandbox (a cancel that arrives before the
# command started there is sent again until the command's answer comes back).
SANDBOX_CANCEL_S = 5.0
SANDBOX_CANCEL_RETRY_S = 0.05
ArtifactRequest = ArtifactReadRequest | ArtifactListRequest | ArtifactArchiveRequest
R = TypeVar("R", ArtifactReadResponse, ArtifactListResponse, ArtifactArchiveResponse)
S = TypeVar("S", SlotArtifactReadRequest, SlotArtifactListRequest, SlotArtifactArchiveRequest)
OnOutput = Callable[[OutputEvent], None]


class Executor:
    def __init__(
        self,
        settings: CallSettings,
        pool: Pool,
        external: ExternalTools,
        journal: LeaseJournal | None = None,
        metrics: ExecutorMetrics | None = None,
        shipping: Shipping | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        # Templates and the layers workspaces are made of (shipping.py); None: no templates.
        self.shipping = shipping
        # One registry for the executor and its pool (the pool records scaling and retirements).
        self.metrics = metrics or pool.metrics
        self.metrics.watch(self.metrics_state)
        self.external = external
        # Which trajectories hold or held leases, for the executor started after this one.
        self.journal = journal or LeaseJournal.in_memory()
        self.trajectories: dict[str, Trajectory] = {}
        self.ended: OrderedDict[str, Ending] = OrderedDict()
        self.replays = Replays(
            ReplayLimits(settings.replay_max_bytes, settings.replay_per_trajectory)
        )
        self.in_service = 0
        self.total_requests = 0
        self.total_errors = 0
        self.latency = LatencyWindow()
        self.recent_errors = RecentErrors()
        self.sweeper: asyncio.Task[None] | None = None
        # The tasks of calls in the service: cancel, shutdown (call_tasks.py).
        self.calls = CallTasks()

    async def start(self) -> None:
        self._recall_lost_workspaces()
        self.pool.adopt = self._adopt
        await self.pool.start()
        await self.external.start()
        self.sweeper = asyncio.create_task(self._expire_idle(), name="lease-expiry")

    async def stop(self) -> None:
        if not self.journal.claimed:
            # Never started, or refused at start since an executor of the same identity runs:
            # the pool (on Nomad, its job) is that executor's. Stop nothing.
            return
        self.calls.stop()
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
                Ending(
                    f"workspace lost for trajectory {trajectory_id!r}: the executor restarted, "
                    "and this workspace did not survive the restart. Its files and processes "
                    "are gone; release the trajectory to start over"
                ),
            )
        if left:
            log.warning("event=leases_of_previous_run count=%d", len(left))

    def _adopt(self, lease: Lease, owner: SlotLease) -> bool:
        """Take over a lease a sandbox recorded (a sandbox that outlived the executor before
        this one): its trajectory's next call finds its files."""
        trajectory_id = owner.trajectory_id
        if trajectory_id in self.trajectories:
            return False  # it leased another slot here meanwhile: that one is its workspace
        trajectory = Trajectory(trajectory_id, lease=lease, group=owner.group)
        if owner.expires_at is not None:
            trajectory.expires_at = time.monotonic() + max(0.0, owner.expires_at - time.time())
        trajectory.owner_recorded = True
        self.trajectories[trajectory_id] = trajectory
        self.ended.pop(trajectory_id, None)
        self.journal.record(trajectory_id, lease.sandbox.sandbox_id, lease.slot_id)
        log.info(
            "event=lease_adopted trajectory=%s sandbox=%s slot=%s",
            trajectory_id,
            lease.sandbox.sandbox_id,
            lease.slot_id,
        )
        return True

    # ---- calls

    def admit(self, count: int = 1) -> None:
        """Count calls into the service, refusing beyond the queue bound and when stopping."""
        if self.calls.draining:
            self.metrics.call_refused("shutting_down")
            raise ShuttingDown("the executor is shutting down and takes no new calls; retry")
        if self.in_service + count > self.settings.max_queue:
            self.metrics.call_refused("queue_full")
            raise QueueFull(
                f"{self.in_service} calls in the service (limit {self.settings.max_queue}); "
                "retry shortly"
            )
        self.in_service += count

    async def execute(
        self,
        trajectory_id: str,
        tool: ToolCall,
        timeout_s: float | None,
        options: LeaseOptions | None = None,
        on_output: OnOutput | None = None,
    ) -> ToolResult:
        """One call, already admitted; answered with a ToolResult whatever happens.

        A call whose trainer set its ``uniq_id`` runs once: sent again while it runs, it waits
        for the same result; sent again later, it gets the stored one (``replayed``).
        ``on_output`` gets a sandbox call's output as its command prints it (``/execute/stream``).
        """
        started = time.monotonic()
        self.total_requests += 1
        key = (trajectory_id, tool.uniq_id) if "uniq_id" in tool.model_fields_set else None
        digest = digest_of(tool, timeout_s) if key is not None else 0
        try:
            result = await self._replayed(key, digest) if key is not None else None
            if result is None:
                run = functools.partial(
                    self._run, trajectory_id, tool, timeout_s, options, on_output
                )
                result = await self._run_once(key, digest, run)
        finally:
            self.in_service -= 1
        result.uniq_id = tool.uniq_id
        outcome = "ok"
        if not result.success:
            self.total_errors += 1
            error_kinds.label(result)
            kind = result.metadata["error_kind"]
            # A tool server may name kinds of its own: the label stays bounded.
            outcome = kind if kind in error_kinds.RETRYABLE else "other"
            self.recent_errors.add(trajectory_id, tool, result)
        elapsed = time.monotonic() - started
        self.latency.add(elapsed)
        tool_name = tool_label(tool.name, self.external.has(tool.name))
        self.metrics.call_answered(tool_name, outcome, elapsed)
        return result

    async def _replayed(self, key: Key, digest: int) -> ToolResult | None:
        """The result of the same call made earlier, once it is there; None: none."""
        running = self.replays.running_call(key, digest)
        if running is not None:
            return replayed(await asyncio.shield(running))
        return self.replays.replay(key, digest)

    async def _run_once(
        self, key: Key | None, digest: int, run: Callable[[], Awaitable[ToolResult]]
    ) -> ToolResult:
        """``run()``, its result kept for repeats of the call when it has a key."""
        if key is None:
            return await run()
        self.replays.begin(key, digest)
        result = None
        try:
            result = await run()
        finally:
            if result is None:  # interrupted: whoever waits for it learns so
                result = ToolResult.failure(
                    "the call was interrupted before it had a result", sandbox_unavailable=True
                )
            self.replays.finish(key, result)
        return result

    async def _run(
        self,
        trajectory_id: str,
        tool: ToolCall,
        timeout_s: float | None,
        options: LeaseOptions | None,
        on_output: OnOutput | None,
    ) -> ToolResult:
        """The call, in its own task's name: a cancellation of that task (a shutdown, a
        ``/cancel``, the client leaving) becomes a result that says so."""
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        try:
            return await self._execute(trajectory_id, tool, timeout_s, options, on_output, task)
        except asyncio.CancelledError:
            reason = self.calls.why_cancelled(task)
            if reason is None:
                raise
            if reason == SHUTDOWN:
                return ToolResult.failure(
                    "the executor shut down while this call ran: its answer is lost. Retry it "
                    "with the same uniq_id on the restarted service",
                    shutting_down=True,
                )
            return ToolResult.failure(f"cancelled: {reason}", cancelled=True)
        finally:
            self.calls.done(task)

    def cancel_task(self, task: asyncio.Task[object], reason: str) -> bool:
        """Cancel one call's task; its result says ``cancelled: <reason>``."""
        return self.calls.cancel(task, reason)

    def cancel(self, trajectory_id: str, reason: str = "by POST /cancel") -> CancelResponse:
        """Stop the trajectory's calls: the one running (its command is killed in the sandbox)
        and those queued behind it."""
        trajectory = self.trajectories.get(trajectory_id)
        cancelled: list[str] = []
        if trajectory is not None:
            for task, uniq_id in list(trajectory.tasks.items()):
                if self.calls.cancel(task, reason):
                    cancelled.append(uniq_id)
        if cancelled:
            log.info("event=calls_cancelled trajectory=%s count=%d", trajectory_id, len(cancelled))
        return CancelResponse(trajectory_id=trajectory_id, cancelled=cancelled)

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no new calls; answer those still running after ``grace_s`` with a clear,
        retryable failure (so that the server's own wait for them ends in a bound)."""
        self.calls.begin_shutdown(grace_s)

    async def _execute(
        self,
        trajectory_id: str,
        tool: ToolCall,
        timeout_s: float | None,
        options: LeaseOptions | None,
        on_output: OnOutput | None,
        task: asyncio.Task[object],
    ) -> ToolResult:
        timeout = effective_timeout(timeout_s, tool.arguments.get("timeout"))
        is_sandbox = tool.name in SANDBOX_TOOLS
        if not is_sandbox and not self.external.has(tool.name):
            known = sorted(SANDBOX_TOOLS | self.external.names())
            return ToolResult.failure(
                f"unknown tool {tool.name!r}; available tools: {', '.join(known)}",
                bad_request=True,
            )
        while True:
            trajectory = self.trajectory(trajectory_id, options)
            trajectory.in_flight += 1
            trajectory.tasks[task] = tool.uniq_id
            try:
                async with trajectory.lock:
                    if self.trajectories.get(trajectory_id) is not trajectory:
                        # Released while this call waited behind the release: run it on the
                        # trajectory as it is now, not on the released object (a lease taken
                        # there could never be seen, released or expired).
                        continue
                    trajectory.calls += 1
                    if is_sandbox:
                        template = options.template if options is not None else None
                        return await self._sandbox_call(
                            trajectory, tool, timeout, on_output, template
                        )
                    return await self._external_call(trajectory_id, tool, timeout)
            finally:
                trajectory.in_flight -= 1
                trajectory.tasks.pop(task, None)
                trajectory.last_used = time.monotonic()

    def trajectory(self, trajectory_id: str, options: LeaseOptions | None = None) -> Trajectory:
        """The trajectory, made on its first call; ``options`` count until it holds a lease."""
        trajectory = self.trajectories.get(trajectory_id)
        if trajectory is None:
            trajectory = self.trajectories[trajectory_id] = Trajectory(trajectory_id)
        if options is not None and trajectory.lease is None:
            if options.group is not None:
                trajectory.group = options.group
            if options.lease_ttl_s is not None:
                trajectory.lease_ttl_s = options.lease_ttl_s
        return trajectory

    async def _sandbox_call(
        self,
        trajectory: Trajectory,
        tool: ToolCall,
        timeout: float,
        on_output: OnOutput | None,
        template: str | None = None,
    ) -> ToolResult:
        ended = self.ended.get(trajectory.trajectory_id)
        if ended is not None:
            return ended_result(ended)
        try:
            if trajectory.lease is None:
                await self.take_lease(trajectory, template)
            else:
                self.check_template(trajectory, template)
        except NoFreeSlot as exc:
            return ToolResult.failure(exc.message, acquire_timeout=True)
        except RequestRefused as exc:  # an unknown template, or another than the lease's
            return ToolResult.failure(exc.message, bad_request=True)
        except SandboxUnavailable as exc:  # the template's files could not be set up
            return ToolResult.failure(exc.message, sandbox_unavailable=True)
        lease = trajectory.lease
        assert lease is not None
        if lease.lost:
            return self._lose(trajectory, "its sandbox stopped")
        item = BatchItem(
            slot_id=lease.slot_id,
            tool=tool.name,
            args=tool.arguments,
            uniq_id=tool.uniq_id,
            timeout=timeout,
            lease=None if trajectory.owner_recorded else trajectory.slot_lease(),
        )
        sandbox = lease.sandbox
        handed_over = time.monotonic()
        answered: asyncio.Future[BatchResult]
        if on_output is not None and sandbox.protocol_version >= STREAM_VERSION:
            answered = asyncio.ensure_future(sandbox.client.execute_streamed(item, on_output))
        else:  # batched with other trajectories' calls to the same sandbox
            answered = sandbox.batcher.enqueue(item)
        try:
            # Shielded: a cancelled call leaves the sandbox's answer to come, and chases it.
            answer = await asyncio.shield(answered)
        except asyncio.CancelledError:
            # Nobody awaits the answer now: read its error when it comes, so none goes unseen.
            answered.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not answered.done() and not self.calls.draining:
                self.pool.own(self._cancel_in_sandbox(lease, answered), f"cancel-{lease.slot_id}")
            raise
        except SandboxUnavailable as exc:
            # The failed call is one strike; a failed health check now is the second.
            await self.pool.probe(lease.sandbox, failures_to_retire=1)
            if lease.lost:
                return self._lose(
                    trajectory, f"its sandbox stopped during this call ({exc.message})"
                )
            return ToolResult.failure(
                f"sandbox {lease.sandbox.sandbox_id} did not answer: {exc.message}",
                sandbox_unavailable=True,
            )
        self.metrics.sandbox_answered(tool.name, time.monotonic() - handed_over)
        trajectory.owner_recorded = True
        metadata = answer.metadata
        metadata.update(sandbox_id=lease.sandbox.sandbox_id, slot_id=lease.slot_id)
        return ToolResult(
            success=answer.success, output=answer.output, error=answer.error, metadata=metadata
        )

    async def take_lease(self, trajectory: Trajectory, template: str | None = None) -> Lease:
        """A slot for the trajectory (``NoFreeSlot`` when none comes in time), its workspace
        made of ``template``'s files when one is named (``UnknownTemplate``; on any failure
        the slot goes back), held by the trajectory from now (``hold``)."""
        known = self.known_template(template)
        layers = (known.layer_id,) if known is not None else ()
        lease = await self.pool.acquire(trajectory.trajectory_id, self.settings.acquire_timeout_s)
        if self.shipping is not None and layers:
            try:
                await self.shipping.start(lease, layers)
            except BaseException:
                self.pool.release(lease)
                raise
            lease.template, lease.layers = template, layers
        self.hold(trajectory, lease)
        return lease

    def known_template(self, template: str | None) -> Template | None:
        """The template of that name (None for None); ``UnknownTemplate`` when there is none."""
        if template is None:
            return None
        if self.shipping is None:
            raise UnknownTemplate(f"unknown template {template!r}: this executor keeps none")
        return self.shipping.registry.get(template)

    def check_template(self, trajectory: Trajectory, template: str | None) -> None:
        """``WorkspaceConflict`` when ``template`` is named for a trajectory whose lease holds
        another workspace than that template's."""
        lease = trajectory.lease
        if template is None or lease is None or lease.template == template:
            return
        raise WorkspaceConflict(
            f"trajectory {trajectory.trajectory_id!r} already holds a workspace "
            f"{lease.origin()}, not one from template {template!r}: leave out the template, "
            "or release the trajectory first"
        )

    def hold(self, trajectory: Trajectory, lease: Lease) -> None:
        """The trajectory holds ``lease`` from now: its lifetime set, and written down for
        the executor that may follow this one."""
        trajectory.lease = lease
        trajectory.owner_recorded = False
        lifetimes = [t for t in (trajectory.lease_ttl_s, self.settings.lease_max_age_s) if t]
        if lifetimes:
            trajectory.expires_at = time.monotonic() + min(lifetimes)
        self.journal.record(trajectory.trajectory_id, lease.sandbox.sandbox_id, lease.slot_id)

    async def _cancel_in_sandbox(self, lease: Lease, answered: asyncio.Future[Any]) -> None:
        """Kill the command of a cancelled call in its slot. A cancel that reaches the sandbox
        before the command started there finds nothing: send it again until the command's
        answer is back, for at most ``SANDBOX_CANCEL_S``."""
        if lease.sandbox.protocol_version < CANCEL_AND_OWNER_VERSION:
            return  # an older sandbox cannot cancel: the command runs to its timeout
        deadline = time.monotonic() + SANDBOX_CANCEL_S
        while not answered.done() and time.monotonic() < deadline:
            try:
                if await lease.sandbox.client.cancel(lease.slot_id):
                    return
            except SandboxUnavailable as exc:
                log.warning("event=sandbox_cancel_failed slot=%s error=%s", lease.slot_id, exc)
                return
            await asyncio.wait([answered], timeout=SANDBOX_CANCEL_RETRY_S)

    def _lose(self, trajectory: Trajectory, why: str) -> ToolResult:
        message = (
            f"workspace lost for trajectory {trajectory.trajectory_id!r}: {why}. Its "
            "files and processes are gone; release the trajectory to start over"
        )
        ending = Ending(message, group=trajectory.group)
        self._end(trajectory, ending)
        return ended_result(ending)

    def _end(self, trajectory: Trajectory, ending: Ending) -> None:
        if trajectory.lease is not None:
            self.pool.release(trajectory.lease)
            trajectory.lease = None
            trajectory.expires_at = None
        self._remember_end(trajectory.trajectory_id, ending)

    def _remember_end(self, trajectory_id: str, ending: Ending) -> None:
        self.ended[trajectory_id] = ending
        self.ended.move_to_end(trajectory_id)
        while len(self.ended) > ENDED_MEMORY:
            forgotten, _ = self.ended.popitem(last=False)
            self.journal.forget(forgotten)

    async def _external_call(
        self, trajectory_id: str, tool: ToolCall, timeout: float
    ) -> ToolResult:
        try:
            result = await self.external.execute(trajectory_id, tool, timeout)
        except ExternalToolError as exc:
            self.metrics.external_answered("unavailable")
            return ToolResult.failure(exc.message, sandbox_unavailable=True)
        self.metrics.external_answered("ok" if result.success else "failed")
        return result

    # ---- release and expiry

    async def release(self, trajectory_id: str, reset_workspace: bool) -> ReleaseResponse:
        """Waits for a running call of the trajectory, then frees its slot.

        The slot is always reset before another trajectory gets it; ``reset_workspace`` only
        decides whether the answer waits for that reset.
        """
        self.replays.forget(trajectory_id)
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

    async def release_group(self, group: str, reset_workspace: bool) -> GroupReleaseResponse:
        """Release every trajectory of ``group``: calls still running are cancelled first (a
        trainer releasing a group is done with it)."""
        members = [t.trajectory_id for t in self.trajectories.values() if t.group == group]
        ended = [tid for tid, ending in self.ended.items() if ending.group == group]
        for trajectory_id in members:
            self.cancel(trajectory_id, f"group {group!r} was released")
        answers = await asyncio.gather(
            *(self.release(tid, reset_workspace) for tid in dict.fromkeys(members + ended)),
            return_exceptions=True,
        )
        released = sum(1 for answer in answers if isinstance(answer, ReleaseResponse))
        log.info("event=group_released group=%s trajectories=%d", group, released)
        return GroupReleaseResponse(group=group, released=released)

    async def open_trajectory(self, trajectory_id: str, options: LeaseOptions) -> TrajectoryInfo:
        """``POST /trajectories``: the trajectory's lease, taken now if it has none."""
        self.known_template(options.template)
        trajectory = self.trajectory(trajectory_id, options)
        async with trajectory.lock:
            ended = self.ended.get(trajectory_id)
            if ended is not None:
                raise WorkspaceGone(ended.message)
            if trajectory.lease is None:
                lease = await self.take_lease(trajectory, options.template)
                await self._record_owner(trajectory, lease)
            else:
                self.check_template(trajectory, options.template)
            trajectory.last_used = time.monotonic()
        return trajectory.describe()

    @contextlib.asynccontextmanager
    async def leased(
        self, trajectory_id: str, options: LeaseOptions | None = None
    ) -> AsyncIterator[Lease]:
        """The trajectory's lease, in order with its calls (its lock held meanwhile). With
        ``options`` the lease is taken when it holds none, as ``POST /trajectories`` does;
        without, ``UnknownTrajectory`` (404). ``WorkspaceGone`` (409) when its lease ended."""
        while True:
            if options is not None:
                self.known_template(options.template)
                trajectory = self.trajectory(trajectory_id, options)
            elif (known := self.trajectories.get(trajectory_id)) is not None:
                trajectory = known
            else:
                raise self._no_lease(trajectory_id)
            async with trajectory.lock:
                if self.trajectories.get(trajectory_id) is not trajectory:
                    continue  # released while this waited: as it is now
                if trajectory.lease is None:
                    if options is None or trajectory_id in self.ended:
                        raise self._no_lease(trajectory_id)
                    lease = await self.take_lease(trajectory, options.template)
                    await self._record_owner(trajectory, lease)
                else:
                    lease = trajectory.lease
                    if options is not None:
                        self.check_template(trajectory, options.template)
                if lease.lost:
                    self._lose(trajectory, "its sandbox stopped")
                    raise self._no_lease(trajectory_id)
                trajectory.last_used = time.monotonic()
                try:
                    yield lease
                finally:
                    trajectory.last_used = time.monotonic()
                return

    def _no_lease(self, trajectory_id: str) -> RequestRefused:
        ended = self.ended.get(trajectory_id)
        if ended is not None:
            return WorkspaceGone(ended.message)
        return UnknownTrajectory(f"unknown trajectory {trajectory_id!r}: it holds no lease")

    async def _record_owner(self, trajectory: Trajectory, lease: Lease) -> None:
        """Record the lease in its slot now (else it goes with the trajectory's first call)."""
        if lease.sandbox.protocol_version < CANCEL_AND_OWNER_VERSION:
            trajectory.owner_recorded = True  # an older sandbox keeps no owners
            return
        try:
            await lease.sandbox.client.set_owner(lease.slot_id, trajectory.slot_lease())
            trajectory.owner_recorded = True
        except SandboxUnavailable as exc:
            log.warning("event=owner_not_recorded slot=%s error=%s", lease.slot_id, exc)

    async def _expire_idle(self) -> None:
        expiry = self.settings.lease_idle_expiry_s
        while True:
            await asyncio.sleep(min(max(expiry / 4, 0.05), 1.0))
            now = time.monotonic()
            for trajectory in list(self.trajectories.values()):
                if trajectory.expires_at is not None and trajectory.expires_at <= now:
                    self._end_by_lifetime(trajectory)
                    continue
                if trajectory.in_flight or trajectory.lock.locked():
                    continue
                if trajectory.last_used > now - expiry:
                    continue
                del self.trajectories[trajectory.trajectory_id]
                if trajectory.lease is not None:
                    log.info(
                        "event=lease_expired trajectory=%s slot=%s",
                        trajectory.trajectory_id,
                        trajectory.lease.slot_id,
                    )
                    message = (
                        f"lease of trajectory {trajectory.trajectory_id!r} expired after "
                        f"{expiry:g}s idle; its workspace was reset. Release the trajectory "
                        "to start over"
                    )
                    self._end(trajectory, Ending(message, True, trajectory.group))

    def _end_by_lifetime(self, trajectory: Trajectory) -> None:
        """The lease outlived its lifetime: its running calls are cancelled, then it ends."""
        if trajectory.tasks:
            self.cancel(trajectory.trajectory_id, "the lease's lifetime ended")
            return  # ended on a later sweep, once its calls have let go of the slot
        if trajectory.lock.locked():
            return
        if self.trajectories.get(trajectory.trajectory_id) is trajectory:
            del self.trajectories[trajectory.trajectory_id]
        log.info("event=lease_lifetime_ended trajectory=%s", trajectory.trajectory_id)
        message = (
            f"lease of trajectory {trajectory.trajectory_id!r} reached the end of its lifetime; "
            "its workspace was reset. Release the trajectory to start over"
        )
        self._end(trajectory, Ending(message, True, trajectory.group))

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
                error=ended.message
                if ended is not None
                else f"No active slot for trajectory {trajectory_id!r}: make a sandbox call first",
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

    def describe_trajectories(
        self, offset: int, limit: int, group: str | None = None
    ) -> TrajectoriesResponse:
        members = self.trajectories.values()
        if group is not None:
            members = [t for t in members if t.group == group]  # type: ignore[assignment]
        ordered = sorted(members, key=lambda t: t.created)
        page = ordered[offset : offset + limit]
        return TrajectoriesResponse(
            total=len(ordered),
            offset=offset,
            limit=limit,
            trajectories=[t.describe() for t in page],
        )

    def metrics_state(self) -> PoolState:
        """What the gauges of a scrape show (``metrics.StateCollector``)."""
        pool = self.pool
        return PoolState(
            calls_in_service=self.in_service,
            trajectories=len(self.trajectories),
            leases=sum(len(s.leased) for s in pool.sandboxes.values()),
            waiting=pool.waiting(),
            slots=pool.slots_by_state(),
            sandboxes=pool.sandboxes_by_state(),
            wanted=pool.sandboxes_wanted(),
            readiness=pool.slots_by_readiness(),
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
            replays=self.replays.describe(),
            errors=self.recent_errors.describe(),
            workspaces=self.shipping.describe() if self.shipping is not None else None,
        )
