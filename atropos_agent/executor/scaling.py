"""How many sandboxes the pool wants: a pure decision from what it holds and who waits.

- **Up** as soon as calls wait for slots: by as many sandboxes as the waiting demand needs
  (at least one more), up to the maximum.
- **Down** past sandboxes idle (no lease, nothing resetting) for the quiet period, from the
  highest index, down to the minimum. A busy sandbox is never passed: everything below the
  highest busy one stays, because Nomad's scale-down removes the highest indexes.
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


def wanted_sandboxes(
    live: Sequence[SandboxLoad], waiting: int, settings: PoolSettings, now: float
) -> int | None:
    """The count to aim for, or None to leave it alone. ``live`` is lowest index first."""
    if waiting:
        busy = sum(sandbox.busy_slots for sandbox in live)
        needed = math.ceil((busy + waiting) / settings.slots_per_sandbox)
        wanted = min(settings.max_sandboxes, max(needed, len(live) + 1))
        return wanted if wanted > len(live) else None
    quiet_since = now - settings.scale_down_idle_s
    keep = 0
    for position, sandbox in enumerate(live):
        if not (sandbox.idle and sandbox.idle_since <= quiet_since):
            keep = position + 1
    wanted = max(settings.min_sandboxes, keep)
    return wanted if wanted < len(live) else None
