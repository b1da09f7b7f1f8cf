"""The sandbox server's Prometheus metrics (docs/operations.md, "Metrics").

Calls are counted as their answers come back from the slots (by tool and outcome) with the
limits they hit; refused items are counted apart. The slots' states, queued calls and agent
restarts are read from the slots when a scrape asks (in the event loop, where they change).
Each server has a registry of its own, never prometheus-client's global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atropos_agent import __version__
from atropos_agent.sandbox.protocol import PROTOCOL_VERSION
from atropos_agent.sandbox.tools import SANDBOX_TOOLS

PREFIX = "atropos_sandbox_"
# What ``metadata.limit_hit`` of a command's answer may name (agent/results.py).
LIMITS = ("timeout", "output", "memory", "processes", "disk")
OUTCOMES = ("ok", "failed", "timeout", "cancelled", "slot_lost")


def outcome_of(answer: dict[str, Any]) -> str:
    """``ok``, or how a call failed: ``timeout``, ``cancelled``, ``slot_lost`` (the slot's
    agent died or stopped answering) or ``failed``."""
    if answer.get("success"):
        return "ok"
    metadata = answer.get("metadata") or {}
    if metadata.get("cancelled"):
        return "cancelled"
    if metadata.get("timeout"):
        return "timeout"
    if metadata.get("slot_lost"):
        return "slot_lost"
    return "failed"


@dataclass(frozen=True)
class SlotsState:
    """The slots at one moment, read at scrape time."""

    # busy (running a call), idle, down (no agent: the next call starts it)
    by_state: Mapping[str, int]
    # warm and cold (free, with or without an agent), leased (the others): warmer.py
    readiness: Mapping[str, int]
    # Calls handed to slots and not answered yet (running or queued).
    pending: int
    # Agents that died or stopped answering during a call, over the server's life.
    restarts: int


class SlotCollector(Collector):
    def __init__(self, state: Callable[[], SlotsState]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        by_state = GaugeMetricFamily(
            PREFIX + "slots",
            "Slots by state: busy (running a call), idle, down (no agent; the next call "
            "starts it).",
            labels=["state"],
        )
        for name, count in state.by_state.items():
            by_state.add_metric([name], count)
        yield by_state
        readiness = GaugeMetricFamily(
            PREFIX + "slot_readiness",
            "Slots by readiness: warm (free, agent started on a wiped workspace), cold (free, "
            "no agent: the first call starts it), leased (an owner, or a call since the reset).",
            labels=["state"],
        )
        for name, count in state.readiness.items():
            readiness.add_metric([name], count)
        yield readiness
        yield GaugeMetricFamily(
            PREFIX + "calls_pending",
            "Calls handed to slots and not answered yet (running or queued).",
            value=state.pending,
        )
        yield CounterMetricFamily(
            PREFIX + "slot_restarts",
            "Slot agents that died or stopped answering during a call.",
            value=state.restarts,
        )


class SandboxMetrics:
    def __init__(self, isolation: str) -> None:
        self.registry = CollectorRegistry()
        Info(PREFIX[:-1], "The sandbox server's version and modes.", registry=self.registry).info(
            {"version": __version__, "protocol": str(PROTOCOL_VERSION), "isolation": isolation}
        )
        self.calls = Counter(
            PREFIX + "calls",
            "Calls answered by the slots, by tool and outcome.",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.refused = Counter(
            PREFIX + "calls_refused",
            "Batch items refused before they ran (unknown slot or tool, an invalid field).",
            registry=self.registry,
        )
        self.limits = Counter(
            PREFIX + "limits_hit",
            "Limits calls hit, by kind (timeout, output, memory, processes, disk).",
            ["limit"],
            registry=self.registry,
        )
        for limit in LIMITS:
            self.limits.labels(limit)
        # Children by label values, looked up once: the call path skips ``labels()``.
        self._calls: dict[tuple[str, str], Any] = {}
        self._limits = {limit: self.limits.labels(limit) for limit in LIMITS}

    def watch(self, state: Callable[[], SlotsState]) -> None:
        """Export the gauges of ``state()``, read at every scrape."""
        self.registry.register(SlotCollector(state))

    def call_answered(self, tool: str, answer: dict[str, Any]) -> None:
        """One call's answer, as its slot gave it (an output limit hits successful calls too)."""
        key = (tool if tool in SANDBOX_TOOLS else "other", outcome_of(answer))
        child = self._calls.get(key)
        if child is None:
            child = self._calls[key] = self.calls.labels(*key)
        child.inc()
        metadata = answer.get("metadata")
        if metadata:
            for limit in metadata.get("limit_hit", ()):
                counter = self._limits.get(limit)
                if counter is not None:
                    counter.inc()

    def call_refused(self) -> None:
        self.refused.inc()
