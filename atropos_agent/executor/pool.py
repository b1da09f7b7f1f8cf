"""The pool: which sandboxes exist, which of their slots are leased, and how many there should be.

Rules that keep workspaces from being mixed up:

- A slot is leased to one trajectory at a time; it returns to the free list only after the
  sandbox has reset it.
- A sandbox that fails two health checks in a row (or a call and then a check), that restarted
  in place (its ``instance_id`` changed), or that the backend no longer lists, is *retired*:
  its leases are lost (their trajectories are told on their next call), and that instance is
  never admitted again, even if it answers later. A replacement is a new instance with
  all-new slots.
- Slots are leased from the lowest-index sandbox first, so that the highest-index ones go idle
  first: those are the ones a shrink (and Nomad's scale-down) removes.
- Within a sandbox, a slot is leased from the front of its free list and a reset one goes back
  to the front: the order in which the sandbox keeps its free slots warm (sandbox/warmer.py),
  so that a new trajectory gets a slot whose agent already runs.

The pool owns the backend and the transport to the sandboxes: ``stop()`` stops both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from atropos_agent.errors import (
    BackendError,
    NoFreeSlot,
    ProtocolMismatch,
    SandboxUnavailable,
)
from atropos_agent.executor.backends.base import Backend, SandboxInfo
from atropos_agent.executor.batcher import Batcher
from atropos_agent.executor.leases import Lease, PoolSandbox
from atropos_agent.executor.metrics import ExecutorMetrics
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.scaling import sandboxes_wanted, wanted_sandboxes
from atropos_agent.executor.settings import PoolSettings
from atropos_agent.executor.transport import AiohttpTransport, Transport
from atropos_agent.sandbox.protocol import SlotLease

log = logging.getLogger("atropos.pool")

FAILED_CHECKS_TO_RETIRE = 2
DISCOVERY_POLL_S = 0.1


@dataclass
class Waiter:
    trajectory_id: str
    future: asyncio.Future[Lease]


class Pool:
    def __init__(
        self,
        settings: PoolSettings,
        backend: Backend,
        transport: Transport | None = None,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.transport = transport or AiohttpTransport()
        self.metrics = metrics or ExecutorMetrics()
        # Ids of the sandboxes the backend listed last (admitted or not).
        self.listed: set[str] = set()
        self.sandboxes: dict[str, PoolSandbox] = {}
        # (sandbox id, instance id) of sandboxes taken out: never admitted again.
        self.retired: set[tuple[str, str]] = set()
        # Sandboxes that answer but cannot be used (a protocol this executor cannot drive).
        self.refused: dict[str, str] = {}
        self.waiters: deque[Waiter] = deque()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.monitor: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.scaling: asyncio.Task[None] | None = None
        self.started = False
        self.backend_error: str | None = None
        self.lost_sandboxes = 0
        # Asked, for a slot a sandbox records as leased when this executor admits it, whether
        # the executor takes that lease over (True) or the slot is reset (False).
        self.adopt: Callable[[Lease, SlotLease], bool] | None = None

    # ---- life cycle

    async def start(self) -> None:
        await self.backend.start(self.settings.min_sandboxes)
        await self.sync()
        self.started = True
        self.monitor = asyncio.create_task(self._monitor(), name="pool-monitor")

    async def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.monitor
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(NoFreeSlot("the service is shutting down"))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(s.batcher.close() for s in self.sandboxes.values()))
        await self.backend.stop()
        await self.transport.close()

    def own(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---- leases

    async def acquire(
        self, trajectory_id: str, timeout_s: float, prefer: PoolSandbox | None = None
    ) -> Lease:
        """A slot for the trajectory, waiting (and scaling up) at most ``timeout_s``;
        ``NoFreeSlot`` after that. A free slot of ``prefer`` first (a fork lands beside its
        source, which holds its files), else the usual order."""
        lease = self._take_from(prefer, trajectory_id) if prefer is not None else None
        lease = lease or self._take(trajectory_id)
        if lease is not None:
            self.metrics.slot_waited(0.0)
            return lease
        waiter = Waiter(trajectory_id, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        self.wake.set()  # the monitor scales up at once, not at its next tick
        started = time.monotonic()
        try:
            lease = await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
            self.metrics.slot_waited(time.monotonic() - started)
            return lease
        except TimeoutError:
            self.metrics.slot_waited(time.monotonic() - started)
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted at the last moment: hand the slot back rather than leak it.
                self.release(waiter.future.result(), reset=False)
            raise NoFreeSlot(self._no_slot_message(timeout_s)) from None
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def _take(self, trajectory_id: str) -> Lease | None:
        for sandbox in sorted(self.sandboxes.values(), key=lambda s: s.info.index):
            lease = self._take_from(sandbox, trajectory_id)
            if lease is not None:
                return lease
        return None

    def _take_from(self, sandbox: PoolSandbox, trajectory_id: str) -> Lease | None:
        if sandbox.free and not sandbox.lost and not sandbox.draining:
            slot_id = sandbox.free.pop(0)
            sandbox.leased[slot_id] = trajectory_id
            return Lease(trajectory_id, sandbox, slot_id)
        return None

    def _grant_waiters(self) -> None:
        while self.waiters:
            waiter = self.waiters[0]
            if waiter.future.done():
                self.waiters.popleft()
                continue
            lease = self._take(waiter.trajectory_id)
            if lease is None:
                return
            self.waiters.popleft()
            waiter.future.set_result(lease)

    def release(self, lease: Lease, reset: bool = True) -> asyncio.Future[None]:
        """Return a slot: it is reset in the sandbox, then free again. Await to wait for that."""
        sandbox = lease.sandbox
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if sandbox.leased.get(lease.slot_id) != lease.trajectory_id:
            done.set_result(None)
            return done
        del sandbox.leased[lease.slot_id]
        if sandbox.lost:
            done.set_result(None)
            return done
        sandbox.resetting.add(lease.slot_id)
        self.own(self._reset_slot(sandbox, lease.slot_id, done), f"reset-{lease.slot_id}")
        return done

    async def _reset_slot(
        self, sandbox: PoolSandbox, slot_id: str, done: asyncio.Future[None] | None = None
    ) -> None:
        try:
            await sandbox.client.reset(slot_id)
        except SandboxUnavailable as exc:
            # The slot stays out of the free list: it is not known to be clean.
            log.error(
                "event=slot_reset_failed sandbox=%s slot=%s error=%s",
                sandbox.sandbox_id,
                slot_id,
                exc.message or type(exc).__name__,
            )
            sandbox.failed_checks += 1
        else:
            if not sandbox.lost:
                sandbox.free.insert(0, slot_id)  # the front: the sandbox warms it first
        finally:
            sandbox.resetting.discard(slot_id)
            if sandbox.idle:
                sandbox.idle_since = time.monotonic()
            if done is not None and not done.done():
                done.set_result(None)
            self._grant_waiters()

    def _no_slot_message(self, timeout_s: float) -> str:
        slots = sum(len(s.slot_ids) for s in self.sandboxes.values() if not s.lost)
        if self.settings.scaling == "external":
            return (
                f"no free slot within {timeout_s:g}s: {len(self.sandboxes)} sandboxes, {slots} "
                "slots, all leased; the pool is scaled from outside (TOOL_EXECUTOR_SCALING="
                "external): release finished trajectories, or see to the autoscaler"
            )
        return (
            f"no free slot within {timeout_s:g}s: {len(self.sandboxes)} sandboxes "
            f"(max {self.settings.max_sandboxes}), {slots} slots, all leased; release "
            "finished trajectories or raise TOOL_EXECUTOR_MAX_CONTAINERS"
        )

    # ---- discovery and health

    async def sync(self) -> None:
        """Admit new sandboxes the backend reports; retire the ones it no longer does."""
        try:
            infos = await self.backend.sandboxes()
        except BackendError as exc:
            self.backend_error = exc.message
            return
        self.backend_error = None
        listed = {info.sandbox_id: info for info in infos}
        self.listed = set(listed)
        for sandbox_id in list(self.sandboxes):
            if sandbox_id not in listed:
                self.retire(self.sandboxes[sandbox_id], "it is no longer running")
        for sandbox_id in list(self.refused):
            if sandbox_id not in listed:
                del self.refused[sandbox_id]
        for info in infos:
            if info.sandbox_id in self.sandboxes:
                self.sandboxes[info.sandbox_id].draining = False
            else:
                await self._admit(info)
        self._grant_waiters()

    async def _admit(self, info: SandboxInfo) -> None:
        client = SandboxClient(info.url, self.transport, self.backend.token)
        try:
            health, slots = await client.admit()
        except ProtocolMismatch as exc:
            if info.sandbox_id not in self.refused:
                log.error("event=sandbox_refused sandbox=%s error=%s", info.sandbox_id, exc)
            self.refused[info.sandbox_id] = exc.message
            return
        except SandboxUnavailable as exc:
            # Expected while a new sandbox starts; it is looked at again on the next sync.
            log.debug("event=sandbox_not_ready sandbox=%s error=%s", info.sandbox_id, exc)
            return
        if (info.sandbox_id, health.instance_id) in self.retired:
            return
        if info.sandbox_id in self.sandboxes:
            # Another sync (a health tick, a scale-up's polling) admitted it while this one
            # waited: a second admission would hand out its leased slots again.
            return
        batcher = Batcher(
            client,
            self.settings.batch_window_s,
            self.settings.max_batch_size,
            on_batch=self.metrics.batch_sent,
        )
        # A sandbox this executor did not start (a restarted executor taking over a running
        # Nomad job) may hold workspaces of earlier trajectories: a slot whose owner the
        # executor adopts stays that trajectory's; every other used slot is reset before use.
        owned = {slot.slot_id: slot.owner for slot in slots if slot.owner is not None}
        used = [slot.slot_id for slot in slots if slot.calls or slot.slot_id in owned]
        free = [slot.slot_id for slot in slots if slot.slot_id not in used]
        sandbox = PoolSandbox(
            info,
            client,
            batcher,
            [slot.slot_id for slot in slots],
            free,
            resetting=set(used),
            instance_id=health.instance_id,
            protocol_version=health.protocol_version,
            workspace_layers=health.workspace_layers,
            warm_reported=health.warm_slots,
        )
        self.sandboxes[info.sandbox_id] = sandbox
        for slot_id, owner in owned.items():
            sandbox.leased[slot_id] = owner.trajectory_id
            lease = Lease(owner.trajectory_id, sandbox, slot_id)
            if self.adopt is not None and self.adopt(lease, owner):
                sandbox.resetting.discard(slot_id)
            else:
                del sandbox.leased[slot_id]
        for slot_id in sorted(sandbox.resetting):
            self.own(self._reset_slot(sandbox, slot_id), f"reset-{slot_id}")
        log.info(
            "event=sandbox_admitted sandbox=%s url=%s slots=%d resetting=%d adopted=%d",
            info.sandbox_id,
            info.url,
            len(slots),
            len(sandbox.resetting),
            len(sandbox.leased),
        )

    def retire(self, sandbox: PoolSandbox, reason: str, cause: str = "gone") -> None:
        """Take a sandbox out for good: its leases are lost, its id never comes back.
        ``cause`` is the metric's label (``metrics.RETIREMENT_CAUSES``)."""
        if sandbox.lost:
            return
        sandbox.lost = True
        sandbox.free.clear()
        self.sandboxes.pop(sandbox.sandbox_id, None)
        self.retired.add((sandbox.sandbox_id, sandbox.instance_id))
        expected = sandbox.draining and not sandbox.leased  # a shrink we asked for
        if not expected:
            self.lost_sandboxes += 1
        self.metrics.sandbox_retired("scaled_down" if expected else cause)
        log.log(
            logging.INFO if expected else logging.WARNING,
            "event=sandbox_retired sandbox=%s leases=%d reason=%r",
            sandbox.sandbox_id,
            len(sandbox.leased),
            reason,
        )
        self.own(sandbox.batcher.close(), f"close-{sandbox.sandbox_id}")

    async def probe(self, sandbox: PoolSandbox, failures_to_retire: int) -> bool:
        """One health check; retire the sandbox once ``failures_to_retire`` checks in a row
        failed, or at once when it restarted in place (same address, new instance)."""
        try:
            health = await sandbox.client.health()
            instance_id, healthy = health.instance_id, True
            sandbox.warm_reported = health.warm_slots
        except SandboxUnavailable:
            instance_id, healthy = "", False
        if healthy and instance_id != sandbox.instance_id:
            # Nomad restarts a task inside its allocation: same address, new sandbox.
            self.retire(sandbox, "it restarted", "restarted")
            return False
        sandbox.failed_checks = 0 if healthy else sandbox.failed_checks + 1
        if sandbox.failed_checks >= failures_to_retire:
            self.retire(sandbox, f"{sandbox.failed_checks} health checks failed", "unhealthy")
            self.metrics.sandbox_replaced()
            with contextlib.suppress(BackendError):
                await self.backend.replace(sandbox.sandbox_id)
        return healthy

    async def check_health(self) -> None:
        sandboxes = list(self.sandboxes.values())
        await asyncio.gather(*(self.probe(s, FAILED_CHECKS_TO_RETIRE) for s in sandboxes))

    # ---- scaling

    def by_index(self) -> list[PoolSandbox]:
        return sorted(self.sandboxes.values(), key=lambda s: s.info.index)

    def desired_count(self) -> int | None:
        """How many sandboxes the pool wants now, or None to leave the count alone."""
        return wanted_sandboxes(self.by_index(), self.waiting(), self.settings, time.monotonic())

    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return sum(1 for w in self.waiters if not w.future.done())

    def sandboxes_wanted(self) -> int:
        """The count the pool wants now, as one number (the gauge outside autoscalers follow)."""
        return sandboxes_wanted(self.by_index(), self.waiting(), self.settings, time.monotonic())

    async def _scale(self, count: int) -> None:
        live = self.by_index()
        idle = set()
        if count < len(live):
            # Stop handing out slots of the sandboxes that may go, before they go.
            for sandbox in live[count:]:
                if sandbox.idle:
                    sandbox.draining = True
                    idle.add(sandbox.sandbox_id)
        direction = "up" if count > len(live) else "down"
        try:
            await self.backend.scale(count, idle)
            self.backend_error = None
        except BackendError as exc:
            self.backend_error = exc.message
            log.error("event=scale_failed count=%d error=%s", count, exc)
            self.metrics.scale_requested(direction, ok=False)
            return
        self.metrics.scale_requested(direction, ok=True)
        await self.sync()
        # A backend may answer before the new sandboxes run (Nomad places them afterwards):
        # look for them often while callers wait, rather than at the next monitor tick.
        deadline = time.monotonic() + self.settings.start_timeout_s
        while count > len(self.sandboxes) and self.waiters and time.monotonic() < deadline:
            await asyncio.sleep(DISCOVERY_POLL_S)
            await self.sync()

    async def _monitor(self) -> None:
        """Health checks, discovery and scaling; woken early when callers wait for slots."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.health_interval_s)
            self.wake.clear()
            try:
                await self.check_health()
                await self.sync()
                # With "external" scaling an autoscaler sets the count: the pool never asks.
                wanted = self.desired_count() if self.settings.scaling == "executor" else None
                if wanted is not None and (self.scaling is None or self.scaling.done()):
                    self.scaling = self.own(self._scale(wanted), "pool-scale")
            except Exception:  # the monitor must outlive any one bad round
                log.exception("event=pool_monitor_error")

    # ---- reporting

    def healthy(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        live = [s for s in self.sandboxes.values() if not s.lost]
        if not live:
            refused = "; ".join(self.refused.values())
            return False, self.backend_error or refused or "no sandbox is running"
        if self.backend_error:
            # Leases keep working on the sandboxes we have, but nothing can be scaled or
            # replaced until the backend answers again.
            return False, f"backend unavailable ({self.backend_error}); {len(live)} sandboxes serve"
        return True, "ok"

    def slots_by_state(self) -> dict[str, int]:
        """Slots of the live sandboxes by the old service's states (``PoolSandbox.slot_states``)."""
        states = {"available": 0, "acquired": 0, "executing": 0, "releasing": 0, "error": 0}
        for sandbox in self.sandboxes.values():
            for state, count in sandbox.slot_states().items():
                states[state] += count
        return states

    def slots_by_readiness(self) -> dict[str, int]:
        """Slots of the live sandboxes: ``warm`` and ``cold`` free ones (as the sandboxes
        last reported), ``leased`` (``PoolSandbox.free_by_readiness``)."""
        states = {"warm": 0, "cold": 0, "leased": 0}
        for sandbox in self.sandboxes.values():
            for state, count in sandbox.free_by_readiness().items():
                states[state] += count
            states["leased"] += len(sandbox.leased)
        return states

    def sandboxes_by_state(self) -> dict[str, int]:
        """``ready`` to lease, ``draining`` (to be stopped by a shrink), ``not_ready`` (listed
        by the backend, not answering yet), ``refused`` (a protocol this executor cannot drive)."""
        draining = sum(1 for s in self.sandboxes.values() if s.draining)
        return {
            "ready": len(self.sandboxes) - draining,
            "draining": draining,
            "not_ready": len(self.listed - self.sandboxes.keys() - self.refused.keys()),
            "refused": len(self.refused),
        }

    def workspace_layers(self) -> str | None:
        """How the pool's sandboxes build workspaces of layers: their one mode, or "mixed"."""
        modes = {s.workspace_layers for s in self.sandboxes.values() if s.workspace_layers}
        return modes.pop() if len(modes) == 1 else "mixed" if modes else None

    def describe(self) -> dict[str, Any]:
        live = self.by_index()
        states = self.slots_by_state()
        total = sum(len(s.slot_ids) for s in live)
        return {
            "backend": self.backend.describe(),
            # The old service's keys (docs/protocol.md), then ours.
            "started": self.started,
            "containers": len(live),
            "total_slots": total,
            "available_slots": states["available"],
            "acquired_slots": states["acquired"] + states["executing"],
            "slots_by_state": states,
            "sandboxes": len(live),
            "min_containers": self.settings.min_sandboxes,
            "max_containers": self.settings.max_sandboxes,
            "slots_per_sandbox": self.settings.slots_per_sandbox,
            "free_slots": states["available"],
            "leased_slots": sum(len(s.leased) for s in live),
            "slots_by_readiness": self.slots_by_readiness(),
            "warm_slots_per_sandbox": self.settings.warm_slots,
            "waiting_for_slot": len(self.waiters),
            "lost_sandboxes": self.lost_sandboxes,
            "backend_error": self.backend_error,
            "refused_sandboxes": self.refused,
            "workspace_layers": self.workspace_layers(),
            "per_sandbox": [s.describe() for s in live],
        }
