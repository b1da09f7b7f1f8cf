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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from atropos_agent.executor.backends.base import Backend, BackendError, SandboxInfo
from atropos_agent.executor.batcher import Batcher
from atropos_agent.executor.settings import ExecutorSettings

log = logging.getLogger("atropos.pool")

HEALTH_TIMEOUT_S = 2.0
FAILED_CHECKS_TO_RETIRE = 2
RESET_TIMEOUT_S = 60.0
DISCOVERY_POLL_S = 0.1


class AcquireTimeout(Exception):
    """No slot became free within the acquire timeout."""


@dataclass
class PoolSandbox:
    info: SandboxInfo
    batcher: Batcher
    slot_ids: list[str]
    free: list[str]
    leased: dict[str, str] = field(default_factory=dict)
    resetting: set[str] = field(default_factory=set)
    instance_id: str = ""
    lost: bool = False
    draining: bool = False
    failed_checks: int = 0
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def sandbox_id(self) -> str:
        return self.info.sandbox_id

    @property
    def idle(self) -> bool:
        return not self.leased and not self.resetting

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "url": self.info.url,
            "index": self.info.index,
            "slots": len(self.slot_ids),
            "free_slots": len(self.free),
            "leased_slots": len(self.leased),
            "resetting_slots": len(self.resetting),
            "draining": self.draining,
            **self.batcher.describe(),
        }


@dataclass
class Lease:
    trajectory_id: str
    sandbox: PoolSandbox
    slot_id: str
    acquired_at: float = field(default_factory=time.time)

    @property
    def lost(self) -> bool:
        return self.sandbox.lost


@dataclass
class Waiter:
    trajectory_id: str
    future: asyncio.Future[Lease]


class Pool:
    def __init__(self, settings: ExecutorSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        # Few idle connections are kept: httpx's pool scans its connections on every request,
        # and after a burst hundreds of idle ones made a lone call 3x slower. Idle ones are
        # also dropped before the sandbox server's 60 s keep-alive runs out.
        limits = httpx.Limits(
            max_connections=4096, max_keepalive_connections=32, keepalive_expiry=30
        )
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0))
        # Batches go over aiohttp: per request it costs a third of httpx's CPU, which is the
        # executor's hot path (docs/benchmarks.md). Control calls use httpx.
        self.batches_http: aiohttp.ClientSession | None = None
        self.sandboxes: dict[str, PoolSandbox] = {}
        # (sandbox id, instance id) of sandboxes taken out: never admitted again.
        self.retired: set[tuple[str, str]] = set()
        self.waiters: deque[Waiter] = deque()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.monitor: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.scaling: asyncio.Task[None] | None = None
        self.started = False
        self.backend_error: str | None = None
        self.lost_sandboxes = 0

    # ---- life cycle

    async def start(self) -> None:
        await self.backend.start(self.settings.min_containers)
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
                waiter.future.set_exception(AcquireTimeout("the service is shutting down"))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(s.batcher.close() for s in self.sandboxes.values()))
        await self.backend.stop()
        await self.client.aclose()
        if self.batches_http is not None:
            await self.batches_http.close()

    def batch_session(self) -> aiohttp.ClientSession:
        """The batches' HTTP client, made on first use (it needs the running loop)."""
        if self.batches_http is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self.batches_http = aiohttp.ClientSession(connector=connector)
        return self.batches_http

    def own(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- leases

    async def acquire(self, trajectory_id: str, timeout_s: float) -> Lease:
        lease = self._take(trajectory_id)
        if lease is not None:
            return lease
        waiter = Waiter(trajectory_id, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        self.wake.set()  # the monitor scales up at once, not at its next tick
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted at the last moment: hand the slot back rather than leak it.
                self.release(waiter.future.result(), reset=False)
            raise AcquireTimeout(self._no_slot_message(timeout_s)) from None
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def _take(self, trajectory_id: str) -> Lease | None:
        for sandbox in sorted(self.sandboxes.values(), key=lambda s: s.info.index):
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
        self, sandbox: PoolSandbox, slot_id: str, done: asyncio.Future[None]
    ) -> None:
        try:
            response = await self.client.post(
                sandbox.info.url + "/reset",
                json={"slot_id": slot_id},
                headers=self._auth(),
                timeout=RESET_TIMEOUT_S,
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            # The slot stays out of the free list: it is not known to be clean.
            log.error(
                "event=slot_reset_failed sandbox=%s slot=%s error=%s",
                sandbox.sandbox_id,
                slot_id,
                exc,
            )
            sandbox.failed_checks += 1
        else:
            if not sandbox.lost:
                sandbox.free.append(slot_id)
        finally:
            sandbox.resetting.discard(slot_id)
            if sandbox.idle:
                sandbox.idle_since = time.monotonic()
            if not done.done():
                done.set_result(None)
            self._grant_waiters()

    def _no_slot_message(self, timeout_s: float) -> str:
        slots = sum(len(s.slot_ids) for s in self.sandboxes.values() if not s.lost)
        return (
            f"no free slot within {timeout_s:g}s: {len(self.sandboxes)} sandboxes "
            f"(max {self.settings.max_containers}), {slots} slots, all leased; release "
            "finished trajectories or raise TOOL_EXECUTOR_MAX_CONTAINERS"
        )

    # ---- discovery, health, scaling

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.backend.token}"}

    async def sync(self) -> None:
        """Admit new sandboxes the backend reports; retire the ones it no longer does."""
        try:
            infos = await self.backend.sandboxes()
        except BackendError as exc:
            self.backend_error = str(exc)
            return
        self.backend_error = None
        listed = {info.sandbox_id: info for info in infos}
        for sandbox_id in list(self.sandboxes):
            if sandbox_id not in listed:
                self.retire(self.sandboxes[sandbox_id], "it is no longer running")
        for info in infos:
            if info.sandbox_id in self.sandboxes:
                self.sandboxes[info.sandbox_id].draining = False
            else:
                await self._admit(info)
        self._grant_waiters()

    async def _admit(self, info: SandboxInfo) -> None:
        try:
            health = await self.client.get(info.url + "/health", timeout=HEALTH_TIMEOUT_S)
            instance_id = str(health.json().get("instance_id", ""))
            if (info.sandbox_id, instance_id) in self.retired:
                return
            response = await self.client.get(
                info.url + "/slots", headers=self._auth(), timeout=HEALTH_TIMEOUT_S
            )
            response.raise_for_status()
            described = response.json()["slots"]
            slot_ids = [str(slot["slot_id"]) for slot in described]
            # A sandbox this executor did not start (a restarted executor taking over a running
            # Nomad job) may hold workspaces of earlier trajectories: reset those before use.
            used = [str(slot["slot_id"]) for slot in described if slot.get("calls")]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # Expected while a new sandbox starts; it is looked at again on the next sync.
            log.debug("event=sandbox_not_ready sandbox=%s error=%s", info.sandbox_id, exc)
            return
        batcher = Batcher(
            info.url,
            self.batch_session(),
            self.backend.token,
            self.settings.batch_window_s,
            self.settings.max_batch_size,
        )
        free = [s for s in slot_ids if s not in used]
        sandbox = PoolSandbox(info, batcher, slot_ids, free, instance_id=instance_id)
        self.sandboxes[info.sandbox_id] = sandbox
        for slot_id in used:
            sandbox.resetting.add(slot_id)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.own(self._reset_slot(sandbox, slot_id, done), f"reset-{slot_id}")
        log.info(
            "event=sandbox_admitted sandbox=%s url=%s slots=%d resetting=%d",
            info.sandbox_id,
            info.url,
            len(slot_ids),
            len(used),
        )

    def retire(self, sandbox: PoolSandbox, reason: str) -> None:
        """Take a sandbox out for good: its leases are lost, its id never comes back."""
        if sandbox.lost:
            return
        sandbox.lost = True
        sandbox.free.clear()
        self.sandboxes.pop(sandbox.sandbox_id, None)
        self.retired.add((sandbox.sandbox_id, sandbox.instance_id))
        expected = sandbox.draining and not sandbox.leased  # a shrink we asked for
        if not expected:
            self.lost_sandboxes += 1
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
            response = await self.client.get(sandbox.info.url + "/health", timeout=HEALTH_TIMEOUT_S)
            healthy = response.status_code == 200
            instance_id = response.json().get("instance_id", "") if healthy else ""
        except (httpx.HTTPError, ValueError):
            healthy, instance_id = False, ""
        if healthy and instance_id != sandbox.instance_id:
            # Nomad restarts a task inside its allocation: same address, new sandbox.
            self.retire(sandbox, "it restarted")
            return False
        sandbox.failed_checks = 0 if healthy else sandbox.failed_checks + 1
        if sandbox.failed_checks >= failures_to_retire:
            self.retire(sandbox, f"{sandbox.failed_checks} health checks failed")
            with contextlib.suppress(BackendError):
                await self.backend.replace(sandbox.sandbox_id)
        return healthy

    async def check_health(self) -> None:
        sandboxes = list(self.sandboxes.values())
        await asyncio.gather(*(self.probe(s, FAILED_CHECKS_TO_RETIRE) for s in sandboxes))

    def desired_count(self) -> int | None:
        """How many sandboxes the pool wants now, or None to leave the count alone."""
        live = sorted(self.sandboxes.values(), key=lambda s: s.info.index)
        per_sandbox = self.settings.slots
        waiting = sum(1 for w in self.waiters if not w.future.done())
        if waiting:
            busy = sum(len(s.leased) + len(s.resetting) for s in live)
            needed = math.ceil((busy + waiting) / per_sandbox)
            wanted = min(self.settings.max_containers, max(needed, len(live) + 1))
            return wanted if wanted > len(live) else None
        quiet = time.monotonic() - self.settings.scale_down_idle_s
        keep = 0
        for position, sandbox in enumerate(live):
            if not (sandbox.idle and sandbox.idle_since <= quiet):
                keep = position + 1
        wanted = max(self.settings.min_containers, keep)
        return wanted if wanted < len(live) else None

    async def _scale(self, count: int) -> None:
        live = sorted(self.sandboxes.values(), key=lambda s: s.info.index)
        idle = set()
        if count < len(live):
            # Stop handing out slots of the sandboxes that may go, before they go.
            for sandbox in live[count:]:
                if sandbox.idle:
                    sandbox.draining = True
                    idle.add(sandbox.sandbox_id)
        try:
            await self.backend.scale(count, idle)
            self.backend_error = None
        except BackendError as exc:
            self.backend_error = str(exc)
            log.error("event=scale_failed count=%d error=%s", count, exc)
            return
        await self.sync()
        # A backend may answer before the new sandboxes run (Nomad places them afterwards):
        # look for them often while callers wait, rather than at the next monitor tick.
        deadline = time.monotonic() + self.settings.sandbox_start_timeout_s
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
                wanted = self.desired_count()
                if wanted is not None and (self.scaling is None or self.scaling.done()):
                    self.scaling = asyncio.create_task(self._scale(wanted), name="pool-scale")
                    self.tasks.add(self.scaling)
                    self.scaling.add_done_callback(self.tasks.discard)
            except Exception:  # the monitor must outlive any one bad round
                log.exception("event=pool_monitor_error")

    # ---- reporting

    def healthy(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        live = [s for s in self.sandboxes.values() if not s.lost]
        if not live:
            return False, self.backend_error or "no sandbox is running"
        if self.backend_error:
            # Leases keep working on the sandboxes we have, but nothing can be scaled or
            # replaced until the backend answers again.
            return False, f"backend unavailable ({self.backend_error}); {len(live)} sandboxes serve"
        return True, "ok"

    def describe(self) -> dict[str, Any]:
        live = list(self.sandboxes.values())
        return {
            "backend": self.backend.describe(),
            "sandboxes": len(live),
            "min_containers": self.settings.min_containers,
            "max_containers": self.settings.max_containers,
            "slots_per_sandbox": self.settings.slots,
            "total_slots": sum(len(s.slot_ids) for s in live),
            "free_slots": sum(len(s.free) for s in live),
            "leased_slots": sum(len(s.leased) for s in live),
            "waiting_for_slot": len(self.waiters),
            "lost_sandboxes": self.lost_sandboxes,
            "backend_error": self.backend_error,
            "per_sandbox": [s.describe() for s in sorted(live, key=lambda s: s.info.index)],
        }
