"""Warm slots: a bounded number of free slots kept ready ahead of demand.

The free slots stand in the order an executor leases them: at start lowest index first, and
a slot reset goes to the front (the executor puts a released slot at the front of its free
list too, and leases from the front: docs/sandbox.md, "Warm slots"). The warmer keeps the
first ``warm_target`` free slots of that order warm (agent started on the wiped workspace) and
every later one cold (no agent, no memory): it warms what fell short when a warm slot was taken
and a reset slot that came to the front, and stops the agent of one pushed out of the window.

It runs in one task the ``Sandbox`` owns, in rounds: a round warms and cools what the order
asks for at its start, a few agents per core at once, each under its slot's lock (a call for a
slot being warmed waits for it; a call that came first leaves the warmer nothing to do there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

from atropos_agent.errors import SandboxStartError
from atropos_agent.sandbox.slot import Slot

log = logging.getLogger("atropos.sandbox")

# Slot agents the warmer starts at once per core: background work, so it takes a share of
# the CPU rather than all of it (sandboxes starting beside it, calls); more would only queue,
# and each agent's start deadline would count the others' time.
STARTS_PER_CPU = 1
# A round runs at least this often, cue or none (an agent that died while idle is replaced).
ROUND_EVERY_S = 5.0
# After a round in which a slot failed to start: the wait before trying again.
RETRY_AFTER_S = 1.0


class Warmer:
    def __init__(self, slots: Sequence[Slot], target: int) -> None:
        self.target = target
        self.order: OrderedDict[str, Slot] = OrderedDict((slot.slot_id, slot) for slot in slots)
        self.wanted = asyncio.Event()
        self.starting = asyncio.Semaphore(max(1, (os.cpu_count() or 1) * STARTS_PER_CPU))
        self.task: asyncio.Task[None] | None = None
        for slot in slots:
            slot.on_free = self.freed
            slot.on_taken = self.taken

    def freed(self, slot: Slot) -> None:
        """A reset slot: next in line to be leased, so first to be warm."""
        self.order.move_to_end(slot.slot_id, last=False)
        self.wanted.set()

    def taken(self, slot: Slot) -> None:
        self.wanted.set()

    def start(self) -> None:
        self.wanted.set()
        self.task = asyncio.create_task(self.run(), name="slot-warmer")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wanted.wait(), ROUND_EVERY_S)
            self.wanted.clear()
            try:
                done = await self.round()
            except Exception:  # the warmer must outlive any one bad round
                log.exception("event=slot_warmer_error")
                done = False
            if not done:
                await asyncio.sleep(RETRY_AFTER_S)

    def plan(self) -> tuple[list[Slot], list[Slot]]:
        """The slots to warm (cold ones inside the window) and to cool (warm ones past it)."""
        free = [slot for slot in self.order.values() if slot.free()]
        inside, past = free[: self.target], free[self.target :]
        return [slot for slot in inside if slot.cold()], [slot for slot in past if slot.warm()]

    async def round(self) -> bool:
        """One round; False when a slot failed to start (it stays cold: its next call starts
        it, and says why when it cannot)."""
        to_warm, to_cool = self.plan()
        if not to_warm and not to_cool:
            return True
        outcomes = await asyncio.gather(
            *(self.warm_up(slot) for slot in to_warm),
            *(slot.cool_down() for slot in to_cool),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        for error in failed:
            if isinstance(error, asyncio.CancelledError):
                raise error
            if not isinstance(error, SandboxStartError):
                log.error("event=slot_warm_failed error=%r", error)
        return not failed

    async def warm_up(self, slot: Slot) -> bool:
        async with self.starting:
            try:
                return await slot.warm_up()
            except SandboxStartError as exc:
                log.warning("event=slot_warm_failed slot=%s error=%s", slot.slot_id, exc)
                raise

    def counts(self) -> dict[str, int]:
        """Slots by readiness: ``warm``, ``cold`` (both free) and ``leased`` (the others)."""
        warm = cold = 0
        for slot in self.order.values():
            if slot.free():
                if slot.fresh():
                    warm += 1
                else:
                    cold += 1
        return {"warm": warm, "cold": cold, "leased": len(self.order) - warm - cold}
