"""The executor's Prometheus metrics (docs/operations.md, "Metrics").

Events are counted where they happen: a call answered, a slot waited for, a batch sent, a scale
asked for, a sandbox retired. A call pays a dict lookup for its label set (the children are
looked up once and kept) and a few adds; nothing else on its path. What the pool *holds*
(calls in the service, leases, slots and sandboxes by state, the sandbox count it wants) is read
when a scrape asks for it, from a snapshot the executor gives (``watch``).

Every executor has a registry of its own, never prometheus-client's global one: several
executors in one process (tests) keep their figures apart. Label values are bounded: a sandbox
tool's name, ``external`` for a tool of the tool server, ``other`` for anything else; outcomes
are ``ok`` or an ``error_kind``. Never a trajectory id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atropos_agent import __version__
from atropos_agent.sandbox.tools import SANDBOX_TOOLS

PREFIX = "atropos_executor_"
# From a trivial call (about 1 ms) to the longest timeout a call may ask for (600 s).
CALL_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
# Up to past the default acquire timeout (30 s).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Why the pool took a sandbox out (``Pool.retire``).
RETIREMENT_CAUSES = ("gone", "restarted", "unhealthy", "scaled_down")
EXTERNAL_OUTCOMES = ("ok", "failed", "unavailable")
REFUSAL_REASONS = ("queue_full", "shutting_down")


def tool_label(name: str, external: bool) -> str:
    """A bounded label for a tool: its name for a sandbox tool, ``external`` for a tool of the
    tool server, ``other`` for a name nobody serves."""
    if name in SANDBOX_TOOLS:
        return name
    return "external" if external else "other"


@dataclass(frozen=True)
class PoolState:
    """What the executor holds at one moment, read at scrape time."""

    calls_in_service: int
    trajectories: int
    leases: int
    # Calls waiting for a slot (their trajectory has none and none is free).
    waiting: int
    slots: Mapping[str, int]
    sandboxes: Mapping[str, int]
    # The sandbox count the pool aims for (``scaling.sandboxes_wanted``).
    wanted: int
    # Slots warm, cold (free, with or without an agent) and leased (``Pool.slots_by_readiness``).
    readiness: Mapping[str, int] = field(default_factory=dict)


class StateCollector(Collector):
    """Gauges made from a ``PoolState`` when a scrape asks (in the event loop: the route and
    the metrics port both run there, so the state is never read half-changed)."""

    def __init__(self, state: Callable[[], PoolState], job_id: str) -> None:
        self.state = state
        self.job_id = job_id

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        yield GaugeMetricFamily(
            PREFIX + "calls_in_service",
            "Calls admitted and not answered yet.",
            value=state.calls_in_service,
        )
        yield GaugeMetricFamily(
            PREFIX + "trajectories", "Trajectories the executor knows.", value=state.trajectories
        )
        yield GaugeMetricFamily(
            PREFIX + "leases", "Trajectories holding a slot.", value=state.leases
        )
        yield GaugeMetricFamily(
            PREFIX + "slot_waiters", "Calls waiting for a free slot.", value=state.waiting
        )
        slots = GaugeMetricFamily(
            PREFIX + "slots", "Slots of the pool's sandboxes by state.", labels=["state"]
        )
        for name, count in state.slots.items():
            slots.add_metric([name], count)
        yield slots
        readiness = GaugeMetricFamily(
            PREFIX + "slot_readiness",
            "Slots of the pool's sandboxes by readiness: warm (free, agent started), cold "
            "(free, started by the first call), leased; free ones as the sandboxes last reported.",
            labels=["state"],
        )
        for name, count in state.readiness.items():
            readiness.add_metric([name], count)
        yield readiness
        sandboxes = GaugeMetricFamily(
            PREFIX + "sandboxes", "Sandboxes of the pool by state.", labels=["state"]
        )
        for name, count in state.sandboxes.items():
            sandboxes.add_metric([name], count)
        yield sandboxes
        wanted = GaugeMetricFamily(
            PREFIX + "sandboxes_wanted",
            "Sandboxes the pool wants now: ceil((leases + waiting + headroom) / slots per "
            "sandbox) (the headroom in warm slots), never below a sandbox still in use, within "
            "min..max.",
            labels=["job_id"],
        )
        wanted.add_metric([self.job_id], state.wanted)
        yield wanted


class ExecutorMetrics:
    """The executor's registry and the counters and histograms its parts record into."""

    def __init__(self, backend: str = "local", job_id: str = "", scaling: str = "executor") -> None:
        self.registry = CollectorRegistry()
        self.job_id = job_id
        registry = self.registry
        Info(PREFIX[:-1], "The executor's version and modes.", registry=registry).info(
            {"version": __version__, "backend": backend, "scaling": scaling}
        )
        self.calls = Counter(
            PREFIX + "calls",
            "Calls answered, by tool and outcome (ok, or the result's error_kind).",
            ["tool", "outcome"],
            registry=registry,
        )
        self.refused = Counter(
            PREFIX + "calls_refused",
            "Calls refused before they ran (503): the queue was full, or the executor stopping.",
            ["reason"],
            registry=registry,
        )
        self.duration = Histogram(
            PREFIX + "call_duration_seconds",
            "A call in the executor, from admission to its answer.",
            ["tool"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.in_sandbox = Histogram(
            PREFIX + "sandbox_duration_seconds",
            "A sandbox call from its hand-over to the batcher to the sandbox's answer.",
            ["tool"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.slot_wait = Histogram(
            PREFIX + "slot_wait_seconds",
            "Waiting for a lease on a slot (0 when one was free).",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.batch_calls = Histogram(
            PREFIX + "batch_calls",
            "Calls per batch sent to a sandbox.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.scale_requests = Counter(
            PREFIX + "scale_requests",
            "Sandbox counts the pool asked its backend for, by direction and outcome.",
            ["direction", "outcome"],
            registry=registry,
        )
        self.retirements = Counter(
            PREFIX + "sandbox_retirements",
            "Sandboxes taken out of the pool, by cause (restarted: a new instance at the same "
            "address; unhealthy: failed health checks; gone: no longer listed; scaled_down).",
            ["cause"],
            registry=registry,
        )
        self.replacements = Counter(
            PREFIX + "sandbox_replacements",
            "Sandboxes the pool asked its backend to replace.",
            registry=registry,
        )
        self.external = Counter(
            PREFIX + "external_calls",
            "Calls forwarded to the external tool server, by outcome.",
            ["outcome"],
            registry=registry,
        )
        # Series that exist from the start, so a rate over them is defined before the first event.
        for direction in ("up", "down"):
            for outcome in ("ok", "failed"):
                self.scale_requests.labels(direction, outcome)
        for cause in RETIREMENT_CAUSES:
            self.retirements.labels(cause)
        for outcome in EXTERNAL_OUTCOMES:
            self.external.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        # Children by label values, looked up once: the call path skips ``labels()``.
        self._answered: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._sandboxed: dict[str, Any] = {}

    def watch(self, state: Callable[[], PoolState]) -> None:
        """Export the gauges of ``state()``, read at every scrape."""
        self.registry.register(StateCollector(state, self.job_id))

    # ---- the call path

    def call_answered(self, tool: str, outcome: str, seconds: float) -> None:
        """``tool`` is a bounded label (``tool_label``)."""
        children = self._answered.get((tool, outcome))
        if children is None:
            children = (self.calls.labels(tool, outcome), self.duration.labels(tool))
            self._answered[(tool, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def sandbox_answered(self, tool: str, seconds: float) -> None:
        """``tool`` is one of ``SANDBOX_TOOLS``."""
        child = self._sandboxed.get(tool)
        if child is None:
            child = self._sandboxed[tool] = self.in_sandbox.labels(tool)
        child.observe(seconds)

    def slot_waited(self, seconds: float) -> None:
        self.slot_wait.observe(seconds)

    def batch_sent(self, calls: int) -> None:
        self.batch_calls.observe(calls)

    def call_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def external_answered(self, outcome: str) -> None:
        self.external.labels(outcome).inc()

    # ---- the pool

    def scale_requested(self, direction: str, ok: bool) -> None:
        self.scale_requests.labels(direction, "ok" if ok else "failed").inc()

    def sandbox_retired(self, cause: str) -> None:
        self.retirements.labels(cause).inc()

    def sandbox_replaced(self) -> None:
        self.replacements.inc()
