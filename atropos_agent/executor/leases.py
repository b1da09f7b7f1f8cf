"""What the pool holds: each sandbox as the pool sees it, and the leases on its slots.

The rules for handing them out are the pool's (``pool.py``); these are the nouns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from atropos_agent.executor.backends.base import SandboxInfo
from atropos_agent.executor.batcher import Batcher
from atropos_agent.executor.sandbox_client import SandboxClient


@dataclass
class PoolSandbox:
    info: SandboxInfo
    client: SandboxClient
    batcher: Batcher
    slot_ids: list[str]
    free: list[str]
    leased: dict[str, str] = field(default_factory=dict)
    resetting: set[str] = field(default_factory=set)
    instance_id: str = ""
    # What the sandbox can do (sandbox/protocol.py: CANCEL_AND_OWNER_VERSION, STREAM_VERSION).
    protocol_version: int = 0
    # How it builds workspaces of layers: "overlay" (copy-on-write), "copy"; None: it cannot.
    workspace_layers: str | None = None
    # Its free slots with their agent started, as its last health check said (None: a sandbox
    # that starts every slot before it is healthy, so all of them).
    warm_reported: int | None = None
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

    @property
    def busy_slots(self) -> int:
        return len(self.leased) + len(self.resetting)

    def slot_states(self) -> dict[str, int]:
        """Slots by the old service's states: ``error`` are those out of use because their
        reset failed (they are not known to be clean)."""
        executing = sum(1 for slot_id in self.leased if self.batcher.calls_by_slot[slot_id])
        accounted = len(self.free) + len(self.leased) + len(self.resetting)
        return {
            "available": len(self.free),
            "acquired": len(self.leased) - executing,
            "executing": executing,
            "releasing": len(self.resetting),
            "error": len(self.slot_ids) - accounted,
        }

    def free_by_readiness(self) -> dict[str, int]:
        """Free slots ``warm`` (agent started) and ``cold`` (started by their first call),
        as of the sandbox's last health check."""
        warm = (
            len(self.free)
            if self.warm_reported is None
            else min(self.warm_reported, len(self.free))
        )
        return {"warm": warm, "cold": len(self.free) - warm}

    def describe(self) -> dict[str, Any]:
        readiness = self.free_by_readiness()
        return {
            "sandbox_id": self.sandbox_id,
            "url": self.info.url,
            "index": self.info.index,
            "slots": len(self.slot_ids),
            "free_slots": len(self.free),
            "leased_slots": len(self.leased),
            "resetting_slots": len(self.resetting),
            "warm_slots": readiness["warm"],
            "cold_slots": readiness["cold"],
            "draining": self.draining,
            "workspace_layers": self.workspace_layers,
            **self.batcher.describe(),
        }


@dataclass
class Lease:
    trajectory_id: str
    sandbox: PoolSandbox
    slot_id: str
    acquired_at: float = field(default_factory=time.time)
    # What the workspace started from (none of these: empty): the template it was made of,
    # or the trajectory it was forked from; and its layers in the sandbox, newest first.
    template: str | None = None
    forked_from: str | None = None
    layers: tuple[str, ...] = ()

    @property
    def lost(self) -> bool:
        return self.sandbox.lost

    def origin(self) -> str:
        """What the workspace started from, as an error message says it."""
        if self.template is not None:
            return f"from template {self.template!r}"
        if self.forked_from is not None:
            return f"forked from trajectory {self.forked_from!r}"
        return "that started empty"
