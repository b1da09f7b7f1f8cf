"""How many sandboxes the pool wants: a pure decision from what it holds and who waits.

- **Up** as soon as calls wait for slots: by as many sandboxes as the waiting demand needs
  (at least one more), up to the maximum.
- **Down** past sandboxes idle (no lease, nothing resetting) for the quiet period, from the
  highest index, down to the minimum. A busy sandbox is never passed: everything below the
  highest busy one stays, because Nomad's scale-down removes the highest indexes.
- **Headroom**: ``headroom_slots`` free slots are kept ready beyond the slots in use and the
  calls waiting, so that a burst finds them without waiting for a sandbox to start (0: none).
  Ready means warm: a sandbox keeps at most ``warm_slots`` of its free slots warm, so only
  those count (slots are leased lowest index first: the free ones are those of the last
  sandbox in use, and every one of an empty sandbox). With ``warm_slots`` 0 or unset every
  free slot counts.

``sandboxes_wanted`` is the same decision as one number, for outside autoscalers (the gauge
``atropos_executor_sandboxes_wanted``, nomad/autoscaler-policy.hcl).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from atropos_agent.executor.settings import PoolSettings


class SandboxLoad(Protocol):
    """What the decision reads of one sandbox."""

    @property
    def busy_slots(self) -> int:
        """Slots leased or being reset."""

    @property
    def idle(self) -> bool: ...

    @property
    def idle_since(self) -> float:
        """``time.monotonic()`` when it last became idle."""


def demand(busy: int, waiting: int, settings: PoolSettings) -> int:
    """Sandboxes enough for the slots in use and the calls waiting, with the headroom in
    slots their sandboxes keep warm."""
    per = settings.slots_per_sandbox
    warm = min(settings.warm_slots or per, per)
    used = busy + waiting
    full = math.ceil(used / per)
    ready = min(full * per - used, warm)  # the free slots of the last sandbox in use
    short = max(0, settings.headroom_slots - ready)
    return full + math.ceil(short / warm)


def still_in_use(live: Sequence[SandboxLoad], settings: PoolSettings, now: float) -> int:
    """How many sandboxes, from the lowest index, a shrink must keep: up to the highest one
    that is busy or was busy within the quiet period."""
    quiet_since = now - settings.scale_down_idle_s
    keep = 0
    for position, sandbox in enumerate(live):
        if not (sandbox.idle and sandbox.idle_since <= quiet_since):
            keep = position + 1
    return keep


def wanted_sandboxes(
    live: Sequence[SandboxLoad], waiting: int, settings: PoolSettings, now: float
) -> int | None:
    """The count to aim for, or None to leave it alone. ``live`` is lowest index first."""
    busy = sum(sandbox.busy_slots for sandbox in live)
    headroom = settings.headroom_slots
    short = headroom > 0 and demand(busy, 0, settings) > len(live)
    if waiting or short:
        needed = demand(busy, waiting, settings)
        if waiting:
            needed = max(needed, len(live) + 1)
        wanted = min(settings.max_sandboxes, needed)
        return wanted if wanted > len(live) else None
    keep = max(still_in_use(live, settings, now), demand(busy, 0, settings))
    wanted = max(settings.min_sandboxes, keep)
    return wanted if wanted < len(live) else None


def sandboxes_wanted(
    live: Sequence[SandboxLoad], waiting: int, settings: PoolSettings, now: float
) -> int:
    """The count the pool wants now, as one number: ``demand`` (``ceil((busy slots + waiting
    + headroom) / slots per sandbox)`` when every slot is warm), never below a sandbox still
    in use (so that a scale-down to it never stops a leased one), within min..max."""
    busy = sum(sandbox.busy_slots for sandbox in live)
    wanted = max(demand(busy, waiting, settings), still_in_use(live, settings, now))
    return max(settings.min_sandboxes, min(settings.max_sandboxes, wanted))
