"""The Nomad backend against the Nomad API double: registration, discovery, fail-fast, scaling,
faults, Nomad going away, purge. Sandboxes are real servers the double runs as raw_exec tasks.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from atropos_agent.errors import BackendError
from atropos_agent.executor.backends.nomad import NomadBackend
from atropos_agent.executor.backends.nomad_job import build_job
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.executor.transport import AiohttpTransport
from harness.nomad_double import NomadDouble
from harness.servers import (
    ExecutorServer,
    free_port,
    nomad_settings,
    start_executor,
    temporary_dir,
)
from tests.executor_support import settings

JOB = "atropos-sandbox-tool-executor"


def executor_on(
    double: NomadDouble, env: dict[str, str] | None = None, **values: str
) -> ExecutorServer:
    """An executor whose pool is on ``double``; ``env`` (from ``settings``) to repeat a spec."""
    full = {**(env or settings()), **settings(**values)}
    if env:
        full["TOOL_EXECUTOR_SANDBOX_SLOT_UID_BASE"] = env["TOOL_EXECUTOR_SANDBOX_SLOT_UID_BASE"]
    return start_executor(backend="nomad", nomad=double, env=full)


def backend_status(server: ExecutorServer) -> dict[str, Any]:
    status: dict[str, Any] = server.status()["pool"]["backend"]
    return status


def wait_for(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def failed_start(
    double: NomadDouble, overrides: dict[str, str] | None = None, **values: str
) -> tuple[int, str, float]:
    """Start an executor that is expected to give up; its exit code, output and time taken."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_")}
    env.update({**nomad_settings(double), **settings(**values), **(overrides or {})})
    started = time.monotonic()
    with temporary_dir() as cwd:
        env["TOOL_EXECUTOR_STATE_DIR"] = str(cwd / "state")
        done = subprocess.run(
            [sys.executable, "-m", "atropos_agent.cli", "serve", "--port", str(free_port())],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


# ---- registration and discovery


def test_registers_job_and_reuses_it_across_executor_restarts(double: NomadDouble) -> None:
    spec = settings()
    first = executor_on(double, spec, purge_job_on_shutdown="false")
    assert first.sh("keep", "echo one")["success"]
    job = double.job(JOB)
    assert job is not None and job["TaskGroups"][0]["Count"] == 1
    # The token lives in a Nomad Variable, not in the job's visible spec.
    assert "ATROPOS_SANDBOX_TOKEN" not in str(job["TaskGroups"][0]["Tasks"][0]["Env"])
    allocations = [a["ID"] for a in double.running(JOB)]
    version = job["Version"]
    first.stop()

    second = executor_on(double, spec, purge_job_on_shutdown="true")
    try:
        assert "event=job_reused" in second.log()
        # Same spec: not re-registered, no allocation replaced, the old token still works.
        assert double.job(JOB)["Version"] == version  # type: ignore[index]
        assert [a["ID"] for a in double.running(JOB)] == allocations
        result = second.sh("fresh", "ls -A /workspace; echo two")
        assert result["success"] and result["output"] == "two"  # reused slots were reset
    finally:
        second.stop()


def test_changed_spec_is_updated_and_said_so(double: NomadDouble) -> None:
    spec = settings()
    first = executor_on(double, spec, purge_job_on_shutdown="false", sandbox_max_processes="100")
    first.stop()
    second = executor_on(double, spec, sandbox_max_processes="120")
    try:
        assert "event=job_spec_differs" in second.log()
        env = double.job(JOB)["TaskGroups"][0]["Tasks"][0]["Env"]  # type: ignore[index]
        assert env["ATROPOS_SANDBOX_MAX_PROCESSES"] == "120"
        assert second.sh("t", "echo ok")["success"]
    finally:
        second.stop()


def test_sandbox_addresses_come_from_allocated_ports(double: NomadDouble) -> None:
    server = executor_on(double)
    try:
        result = server.sh("t", "echo hi")
        assert result["success"]
        (allocation,) = double.running(JOB)
        port = allocation["AllocatedResources"]["Shared"]["Ports"][0]
        assert port["Label"] == "http"
        known = backend_status(server)["allocations"]
        assert known == [
            {
                "sandbox_id": allocation["ID"],
                "index": 0,
                "url": f"http://{port['HostIP']}:{port['Value']}",
            }
        ]
        assert result["metadata"]["sandbox_id"] == allocation["ID"]
    finally:
        server.stop()


# ---- failing fast


def test_missing_driver_fails_fast_with_the_cause(double: NomadDouble) -> None:
    code, output, elapsed = failed_start(double, nomad_driver="docker")
    assert code != 0
    assert "missing drivers" in output and "TOOL_EXECUTOR_NOMAD_DRIVER" in output
    assert elapsed < 30


def test_task_that_cannot_start_fails_fast(double: NomadDouble) -> None:
    code, output, elapsed = failed_start(double, nomad_raw_exec_command="/nonexistent/python3")
    assert code != 0
    assert "cannot start" in output and "Driver Failure" in output
    assert elapsed < 30


def test_crash_loop_fails_fast(double: NomadDouble) -> None:
    # A task that exits at once, restarted twice 1 s apart, then given up by Nomad.
    code, output, elapsed = failed_start(
        double, nomad_raw_exec_command="/bin/false", nomad_restart_attempts="2"
    )
    assert code != 0
    assert "Not Restarting" in output or "Exceeded" in output, output[-2000:]
    assert elapsed < 45


def test_wrong_acl_token_is_reported(double: NomadDouble) -> None:
    code, output, _ = failed_start(double, {"NOMAD_TOKEN": "not-the-token"})
    assert code != 0
    assert "Nomad refused" in output and "NOMAD_TOKEN" in output


# ---- scaling


def test_scales_up_under_demand_and_down_around_leases(double: NomadDouble) -> None:
    server = executor_on(
        double,
        slots="2",
        min_containers="1",
        max_containers="3",
        scale_down_idle_s="2",
        acquire_timeout_s="60",
    )
    try:
        results: dict[str, dict[str, Any]] = {}

        def lease(name: str) -> None:
            with httpx.Client(
                base_url=server.url, timeout=90, headers={"Authorization": f"Bearer {server.token}"}
            ) as client:
                body = {
                    "trajectory_id": name,
                    "tool": {"name": "terminal", "arguments": {"command": "echo up"}},
                }
                results[name] = client.post("/execute", json=body).json()

        threads = [threading.Thread(target=lease, args=(f"t{i}",)) for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert all(r["success"] for r in results.values()), results
        assert len(double.running(JOB)) == 3
        by_index = {a["ID"]: int(a["Name"].rsplit("[", 1)[1][:-1]) for a in double.running(JOB)}
        holder = max(results, key=lambda t: by_index[results[t]["metadata"]["sandbox_id"]])
        assert by_index[results[holder]["metadata"]["sandbox_id"]] == 2

        # Everything but the trajectory on the highest index is released: Nomad would stop
        # that allocation first, so the pool must not shrink at all.
        for name in results:
            if name != holder:
                server.client.post(
                    "/release", json={"trajectory_id": name, "reset_workspace": True}
                )
        time.sleep(4)
        assert len(double.running(JOB)) == 3
        assert server.sh(holder, "echo still here")["success"]

        server.client.post("/release", json={"trajectory_id": holder})
        wait_for(lambda: len(double.running(JOB)) == 1, 30, "the pool to shrink to one")
        assert double.job(JOB)["TaskGroups"][0]["Count"] == 1  # type: ignore[index]
        assert server.sh("after", "echo ok")["success"]
    finally:
        server.stop()


# ---- faults


def test_allocation_killed_mid_batch(double: NomadDouble) -> None:
    server = executor_on(double, slots="1", min_containers="2", max_containers="2")
    try:
        doomed = server.sh("doomed", "echo secret > mine; echo a")["metadata"]["sandbox_id"]
        bystander = server.sh("bystander", "echo b")["metadata"]["sandbox_id"]
        assert doomed != bystander
        outcome: dict[str, dict[str, Any]] = {}

        def call(name: str, command: str) -> None:
            with httpx.Client(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {server.token}"}
            ) as client:
                body = {
                    "trajectory_id": name,
                    "tool": {"name": "terminal", "arguments": {"command": command}},
                }
                outcome[name] = client.post("/execute", json=body).json()

        threads = [
            threading.Thread(target=call, args=("doomed", "sleep 5")),
            threading.Thread(target=call, args=("bystander", "sleep 2; echo fine")),
        ]
        for thread in threads:
            thread.start()
        time.sleep(1)
        double.kill_task(doomed)
        for thread in threads:
            thread.join(timeout=60)
        # The killed allocation's call fails clearly; the other sandbox's call is unharmed.
        assert outcome["doomed"]["success"] is False
        assert "workspace lost" in outcome["doomed"]["error"], outcome["doomed"]
        assert outcome["bystander"]["success"] and outcome["bystander"]["output"] == "fine"
        later = server.sh("doomed", "echo again")
        assert later["success"] is False and "workspace lost" in later["error"]

        # The sandbox comes back (restarted in its allocation, or replaced by a new one at the
        # same index): its slot goes to a new trajectory with an empty workspace.
        fresh = server.sh("fresh", "ls -A /workspace; echo fresh")
        assert fresh["success"] and fresh["output"] == "fresh", fresh
        assert fresh["metadata"]["sandbox_id"] != bystander
        assert server.sh("doomed", "echo still lost")["success"] is False
        for name in ("doomed", "fresh"):
            assert server.client.post("/release", json={"trajectory_id": name}).status_code == 200
        back = server.sh("doomed", "ls -A /workspace; echo back")
        assert back["success"] and back["output"] == "back"
    finally:
        server.stop()


def test_nomad_down_then_back(double: NomadDouble) -> None:
    server = executor_on(
        double, slots="2", min_containers="1", max_containers="2", acquire_timeout_s="30"
    )
    try:
        assert server.sh("held", "echo before")["success"]
        double.go_down()
        # Leases keep working without Nomad; health says degraded.
        assert server.sh("held", "echo during")["output"] == "during"
        wait_for(
            lambda: httpx.get(server.url + "/health").status_code == 503,
            15,
            "/health to report degraded",
        )
        assert httpx.get(server.url + "/health").json()["status"] == "degraded"
        double.come_back()
        wait_for(
            lambda: httpx.get(server.url + "/health").status_code == 200, 30, "/health to recover"
        )
        # Scaling works again: more trajectories than one sandbox holds.
        for name in ("a", "b"):
            assert server.sh(name, "echo more")["success"]
        assert len(double.running(JOB)) == 2
    finally:
        server.stop()


def test_purge_on_shutdown(double: NomadDouble) -> None:
    server = executor_on(double)
    assert server.sh("t", "echo hi")["success"]
    pids = [pid for a in double.running(JOB) for pid in double.pids(a["ID"])]
    assert pids
    server.stop()
    assert double.job(JOB) is None
    wait_for(lambda: not double.running(JOB), 15, "allocations to stop")


def test_unreachable_nomad_at_start_is_reported(double: NomadDouble) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, output, elapsed = failed_start(double, {"TOOL_EXECUTOR_NOMAD_ADDRESS": nowhere})
    assert code != 0
    assert f"Nomad at {nowhere} did not answer" in output
    assert elapsed < 30


def test_scale_refused_during_a_deployment_is_retried_with_backoff(double: NomadDouble) -> None:
    """A job that still has deployments on (an operator's edit) answers 400 to a scale while
    its deployment runs; the backend backs off and the next attempt goes through."""
    env = {**nomad_settings(double), **settings(max_containers="2")}
    values: dict[str, Any] = {
        k.removeprefix("TOOL_EXECUTOR_").lower(): v
        for k, v in env.items()
        if k.startswith("TOOL_EXECUTOR_")
    }
    config = ExecutorSettings.model_validate({**values, "nomad_token": env["NOMAD_TOKEN"]})
    job = build_job(config.nomad())
    job["TaskGroups"][0]["Update"] = {"MaxParallel": 1}  # the hash still matches: reused
    headers = {"X-Nomad-Token": env["NOMAD_TOKEN"]}
    registered = httpx.post(f"{double.address}/v1/jobs", json={"Job": job}, headers=headers)
    assert registered.status_code == 200, registered.text

    async def scenario() -> None:
        transport = AiohttpTransport()
        backend = NomadBackend(config.nomad(), transport)
        try:
            await backend.start(1)
            with pytest.raises(BackendError, match="active deployment"):
                await backend.scale(2, idle=())
            assert backend.scale_failures == 1
            await backend.scale(2, idle=())  # inside the back-off: not even sent
            assert backend.scale_failures == 1
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                try:
                    await backend.scale(2, idle=())
                except BackendError:
                    continue
                if backend.scale_failures == 0:
                    break
            assert backend.scale_failures == 0
        finally:
            await backend.stop()
            await transport.close()

    asyncio.run(scenario())
    assert double.job(JOB) is None  # purged
