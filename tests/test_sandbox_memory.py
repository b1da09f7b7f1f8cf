"""An idle slot costs at most 10 MiB beyond the server itself."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.slot_memory import measure
from harness.servers import SandboxServer


def test_idle_slot_memory_under_10_mib(sandbox_factory: Callable[..., SandboxServer]) -> None:
    slots = 8
    server = sandbox_factory(slots=slots)
    items = [
        {"slot_id": f"slot_{i}", "tool": "terminal", "args": {"command": "true"}}
        for i in range(slots)
    ]
    assert all(r["success"] for r in server.client.post("/batch", json=items).json())
    figures = measure(server.process.pid, slots)
    assert figures["processes_per_slot"] == 3  # outer bwrap, namespace init, agent
    assert figures["pss_per_slot_mib"] <= 10, figures
