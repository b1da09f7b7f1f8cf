"""Calls by ``(trajectory_id, uniq_id)``: a retried call runs once.

A call the trainer sends again (its connection broke, it timed out, it restarted) with the
same ``uniq_id`` must not run the command twice. While the first runs, the second waits for
it; after it finished, the second gets its stored result with ``metadata.replayed``. Results
are held in memory within a byte budget and a count per trajectory (oldest forgotten first),
and forgotten when the trajectory is released.

A repeat must also ask the same (tool, arguments, timeout: compared by digest, a hash this
process computes for both): a trainer that reuses a ``uniq_id`` for a different call gets
that call run, as the old service did.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from atropos_agent.models import ToolCall, ToolResult

Key = tuple[str, str]


@dataclass(frozen=True)
class ReplayLimits:
    max_bytes: int = 256 * 1024 * 1024
    per_trajectory: int = 1024


def digest_of(tool: ToolCall, timeout_s: float | None) -> int:
    # repr, not JSON: five times cheaper, and a repeat parses to the same dict (same key order).
    return hash(repr((tool.name, tool.arguments, timeout_s)))


def size_of(result: ToolResult) -> int:
    # The text dominates; the rest is a rough, constant overhead per entry.
    return len(result.output) + len(result.error) + 512


class Replays:
    def __init__(self, limits: ReplayLimits) -> None:
        self.limits = limits
        # A running call's digest, and the future its repeats wait on (made by the first).
        self.running: dict[Key, tuple[int, asyncio.Future[ToolResult] | None]] = {}
        self.stored: OrderedDict[Key, tuple[int, ToolResult]] = OrderedDict()
        self.by_trajectory: defaultdict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        self.bytes = 0

    def replay(self, key: Key, digest: int) -> ToolResult | None:
        """The stored result of the same finished call, marked ``replayed``; else None."""
        stored = self.stored.get(key)
        if stored is None or stored[0] != digest:
            return None
        return replayed(stored[1])

    def running_call(self, key: Key, digest: int) -> asyncio.Future[ToolResult] | None:
        """The future of the same call while it runs (None: it does not run now)."""
        running = self.running.get(key)
        if running is None or running[0] != digest:
            return None
        future = running[1]
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.running[key] = (digest, future)
        return future

    def begin(self, key: Key, digest: int) -> None:
        """The call is about to run: later calls with its key wait for its result."""
        self.running[key] = (digest, None)

    def finish(self, key: Key, result: ToolResult) -> None:
        running = self.running.pop(key, None)
        if running is None:
            return
        digest, future = running
        if future is not None and not future.done():
            future.set_result(result)
        self._store(key, digest, result)

    def forget(self, trajectory_id: str) -> None:
        for uniq_id in self.by_trajectory.pop(trajectory_id, {}):
            self._drop((trajectory_id, uniq_id))

    def describe(self) -> dict[str, int]:
        return {"stored": len(self.stored), "bytes": self.bytes, "running": len(self.running)}

    def _store(self, key: Key, digest: int, result: ToolResult) -> None:
        self._drop(key)
        self.stored[key] = (digest, result)
        self.bytes += size_of(result)
        calls = self.by_trajectory[key[0]]
        calls[key[1]] = None
        while len(calls) > self.limits.per_trajectory:
            oldest, _ = calls.popitem(last=False)
            self._drop((key[0], oldest))
        while self.bytes > self.limits.max_bytes and self.stored:
            (trajectory_id, uniq_id), _ = next(iter(self.stored.items()))
            self._drop((trajectory_id, uniq_id))
            others = self.by_trajectory.get(trajectory_id)
            if others is not None:
                others.pop(uniq_id, None)
                if not others:
                    del self.by_trajectory[trajectory_id]

    def _drop(self, key: Key) -> None:
        stored = self.stored.pop(key, None)
        if stored is not None:
            self.bytes -= size_of(stored[1])


def replayed(result: ToolResult) -> ToolResult:
    return result.model_copy(update={"metadata": {**result.metadata, "replayed": True}})
