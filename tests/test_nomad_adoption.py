"""An executor restart on Nomad loses no lease: the sandboxes outlive the executor, record who
holds each slot, and the next executor adopts those leases; a call in flight at the stop,
retried with its uniq_id, runs once."""

from __future__ import annotations

import signal
import time
from typing import Any

from harness.nomad_double import NomadDouble
from harness.servers import ExecutorServer, start_executor
from tests.executor_support import Background, settings, wait_in_flight

TRAJECTORIES = [f"kept-{i}" for i in range(20)]


def executor_on(double: NomadDouble, spec: dict[str, str]) -> ExecutorServer:
    return start_executor(backend="nomad", nomad=double, env=spec)


def execute(
    server: ExecutorServer, trajectory: str, command: str, uniq_id: str | None = None, **lease: Any
) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": "terminal", "arguments": {"command": command}}
    if uniq_id is not None:
        tool["uniq_id"] = uniq_id
    body = {"trajectory_id": trajectory, "tool": tool, **lease}
    response = server.client.post("/execute", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_a_restarted_executor_adopts_every_lease_and_runs_a_retried_call_once(
    double: NomadDouble,
) -> None:
    # A rolling restart keeps the pool job (no purge); two sandboxes of 12 slots.
    spec = settings(
        slots="12",
        min_containers="2",
        max_containers="2",
        purge_job_on_shutdown="false",
        shutdown_grace_s="0.5",
    )
    first = executor_on(double, spec)
    for trajectory in TRAJECTORIES:
        result = execute(first, trajectory, f"echo {trajectory} > mine.txt", group="run-1")
        assert result["success"], result
    in_flight = Background(
        lambda: execute(
            first, "busy", "sleep 2; echo ran >> count.txt; echo finished", uniq_id="call-1"
        )
    )
    wait_in_flight(first, "busy", 1)
    first.process.send_signal(signal.SIGTERM)
    interrupted = in_flight.result(30)
    assert interrupted["success"] is False
    assert interrupted["metadata"]["error_kind"] == "sandbox_error"
    assert interrupted["metadata"]["retryable"] is True
    first.process.wait(30)
    first.stop()

    second = executor_on(double, spec)
    try:
        assert "event=lease_adopted" in second.log()
        for trajectory in TRAJECTORIES:
            result = execute(second, trajectory, "cat mine.txt")
            assert result["success"] and result["output"] == trajectory, result
        listed = second.client.get("/trajectories", params={"group": "run-1", "limit": 100})
        assert listed.json()["total"] == len(TRAJECTORIES)

        started = time.monotonic()
        retried = execute(
            second, "busy", "sleep 2; echo ran >> count.txt; echo finished", uniq_id="call-1"
        )
        assert retried["success"] and retried["output"] == "finished", retried
        assert retried["metadata"]["replayed"] is True
        assert time.monotonic() - started < 2.5
        count = execute(second, "busy", "cat count.txt")
        assert count["output"] == "ran", "the call ran exactly once"
        released = second.client.post("/release", json={"group": "run-1"})
        assert released.json()["released"] == len(TRAJECTORIES)
    finally:
        second.stop()
