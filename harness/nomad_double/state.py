"""The double's state store: one lock, a raft-like index, and the records Nomad keeps.

Everything here is plain data guarded by ``State.lock``; behaviour lives in the scheduler,
the node (task runners) and the HTTP handlers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Json, new_id, now_ns


@dataclass
class TaskState:
    """A task's state inside an allocation (``TaskStates`` in the alloc JSON)."""

    state: str = "pending"
    failed: bool = False
    restarts: int = 0
    started_at: int = 0
    finished_at: int = 0
    last_restart: int = 0
    events: list[Json] = field(default_factory=list)


@dataclass
class Port:
    label: str
    value: int
    to: int


@dataclass
class Allocation:
    id: str
    namespace: str
    eval_id: str
    name: str
    index: int
    job_id: str
    task_group: str
    job: Json
    node_id: str
    node_name: str
    ports: list[Port]
    cpu: int
    memory_mb: int
    disk_mb: int
    create_index: int
    create_time: int
    modify_index: int = 0
    modify_time: int = 0
    alloc_modify_index: int = 0
    desired_status: str = "run"
    desired_description: str = ""
    desired_migrate: bool = False
    client_status: str = "pending"
    client_description: str = ""
    task_states: dict[str, TaskState] = field(default_factory=dict)
    deployment_id: str = ""
    deployment_healthy: bool | None = None
    deployment_timestamp: int = 0
    previous_allocation: str = ""
    next_allocation: str = ""
    reschedule_events: list[Json] = field(default_factory=list)
    followup_eval_id: str = ""
    metrics: Json = field(default_factory=dict)
    alloc_root: Path | None = None

    @property
    def terminal(self) -> bool:
        """Nomad's TerminalStatus: desired stop/evict or a terminal client status."""
        return self.desired_status in ("stop", "evict") or self.client_status in (
            "complete",
            "failed",
            "lost",
        )

    @property
    def client_terminal(self) -> bool:
        return self.client_status in ("complete", "failed", "lost")


@dataclass
class Evaluation:
    id: str
    namespace: str
    priority: int
    type: str
    triggered_by: str
    job_id: str
    job_modify_index: int
    status: str
    create_index: int
    create_time: int
    modify_index: int = 0
    modify_time: int = 0
    status_description: str = ""
    previous_eval: str = ""
    next_eval: str = ""
    blocked_eval: str = ""
    failed_tg_allocs: dict[str, Json] | None = None
    queued_allocations: dict[str, int] = field(default_factory=dict)
    deployment_id: str = ""
    wait_until: int = 0
    exhausted_dimension: bool = False


@dataclass
class Deployment:
    id: str
    namespace: str
    job_id: str
    job_version: int
    job_modify_index: int
    job_create_index: int
    status: str
    status_description: str
    task_groups: dict[str, Json]
    create_index: int
    create_time: int
    modify_index: int = 0
    modify_time: int = 0

    @property
    def active(self) -> bool:
        return self.status in (
            "running",
            "pending",
            "paused",
            "blocked",
            "unblocking",
            "initializing",
        )


@dataclass
class Variable:
    namespace: str
    path: str
    items: dict[str, str]
    create_index: int
    create_time: int
    modify_index: int
    modify_time: int


@dataclass
class Node:
    """The one client node of the double."""

    id: str = field(default_factory=new_id)
    name: str = "nomad-double"
    datacenter: str = "dc1"
    node_pool: str = "default"
    cpu_mhz: int = 40_000
    memory_mb: int = 65_536
    disk_mb: int = 1_000_000
    drivers: set[str] = field(default_factory=lambda: {"raw_exec"})


class State:
    """All records plus the lock, the index and the condition blocking queries wait on."""

    def __init__(self, *, region: str, namespaces: set[str], node: Node) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.index = 1
        self.region = region
        self.namespaces = namespaces
        self.node = node
        self.jobs: dict[tuple[str, str], Json] = {}
        self.allocs: dict[str, Allocation] = {}
        self.evals: dict[str, Evaluation] = {}
        self.deployments: dict[str, Deployment] = {}
        self.variables: dict[tuple[str, str], Variable] = {}
        self.scale_events: dict[tuple[str, str], dict[str, list[Json]]] = {}
        self.closing = False
        self._timers: set[threading.Timer] = set()

    def next_index(self) -> int:
        """Apply a "raft" write: bump the index and wake blocking queries."""
        with self.lock:
            self.index += 1
            self.changed.notify_all()
            return self.index

    def wait_past(self, index: int, timeout_s: float) -> None:
        """Block until the index exceeds ``index`` or the wait elapses (a blocking query)."""
        with self.changed:
            self.changed.wait_for(lambda: self.index > index or self.closing, timeout_s)

    def job_allocs(self, namespace: str, job_id: str, create_index: int | None) -> list[Allocation]:
        found = [
            alloc
            for alloc in self.allocs.values()
            if alloc.namespace == namespace and alloc.job_id == job_id
        ]
        if create_index is not None:
            found = [a for a in found if a.job.get("CreateIndex") == create_index]
        return sorted(found, key=lambda a: (a.create_index, a.id))

    def touch_alloc(self, alloc: Allocation) -> None:
        alloc.modify_index = self.next_index()
        alloc.modify_time = now_ns()

    def after(self, delay_s: float, action: Callable[[], Any]) -> None:
        """Run ``action`` under the lock after ``delay_s``, unless the double closes first."""

        def fire() -> None:
            with self.lock:
                self._timers.discard(timer)
                if self.closing:
                    return
                action()

        timer = threading.Timer(max(0.0, delay_s), fire)
        timer.daemon = True
        with self.lock:
            if self.closing:
                return
            self._timers.add(timer)
        timer.start()

    def cancel_timers(self) -> None:
        with self.lock:
            timers = list(self._timers)
            self._timers.clear()
        for timer in timers:
            timer.cancel()
