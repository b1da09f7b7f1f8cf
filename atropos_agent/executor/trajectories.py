"""A trajectory as the executor holds it: its lease, its calls, its group and lifetime; how
a lease that ended without a release is remembered; and the latency and recent-errors windows
of /status."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from atropos_agent.executor.leases import Lease
from atropos_agent.models import ToolCall, ToolResult, TrajectoryInfo
from atropos_agent.sandbox.protocol import SlotLease


def ended_result(ending: Ending) -> ToolResult:
    if ending.lease_expired:
        return ToolResult.failure(ending.message, workspace_lost=True, lease_expired=True)
    return ToolResult.failure(ending.message, workspace_lost=True)


@dataclass
class Ending:
    """How a trajectory's lease ended without a release: what its later calls are told."""

    message: str
    lease_expired: bool = False
    group: str | None = None


@dataclass
class Trajectory:
    trajectory_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lease: Lease | None = None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    in_flight: int = 0
    group: str | None = None
    lease_ttl_s: float | None = None
    # When the lease ends by its lifetime (monotonic clock); None: only idle expiry.
    expires_at: float | None = None
    # The tasks of this trajectory's calls in the service (running or queued): their uniq_ids.
    tasks: dict[asyncio.Task[object], str] = field(default_factory=dict)
    # Whether the slot records this lease as its owner yet (sent with the next call).
    owner_recorded: bool = False

    def slot_lease(self) -> SlotLease:
        """The lease as its slot records it, for an executor that may adopt it later."""
        expires_at = None
        if self.expires_at is not None:
            expires_at = time.time() + max(0.0, self.expires_at - time.monotonic())
        return SlotLease(trajectory_id=self.trajectory_id, group=self.group, expires_at=expires_at)

    def describe(self) -> TrajectoryInfo:
        lease = self.lease
        expires_in = None
        if self.expires_at is not None:
            expires_in = round(max(0.0, self.expires_at - time.monotonic()), 3)
        return TrajectoryInfo(
            trajectory_id=self.trajectory_id,
            sandbox_id=lease.sandbox.sandbox_id if lease else None,
            slot_id=lease.slot_id if lease else None,
            age_s=round(time.time() - self.created, 3),
            idle_s=round(time.monotonic() - self.last_used, 3),
            calls=self.calls,
            in_flight=self.in_flight,
            group=self.group,
            expires_in_s=expires_in,
            template=lease.template if lease else None,
            forked_from=lease.forked_from if lease else None,
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


class RecentErrors:
    """The latest N failed calls and the count of failures by ``error_kind`` since start, for
    /status: what an operator looks at first when errors rise."""

    # Enough of an error to recognise it; the full text went to the trainer.
    MAX_ERROR_CHARS = 200

    def __init__(self, size: int = 20) -> None:
        self.latest: deque[dict[str, object]] = deque(maxlen=size)
        # Bounded: error kinds are a closed set (error_kinds.ErrorKind).
        self.by_kind: dict[str, int] = {}

    def add(self, trajectory_id: str, tool: ToolCall, result: ToolResult) -> None:
        kind = str(result.metadata.get("error_kind", "tool_failed"))
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.latest.append(
            {
                "at": round(time.time(), 3),
                "trajectory_id": trajectory_id,
                "tool": tool.name,
                "error_kind": kind,
                "error": result.error[: self.MAX_ERROR_CHARS],
            }
        )

    def describe(self) -> dict[str, object]:
        return {"by_kind": dict(self.by_kind), "latest": list(self.latest)}
