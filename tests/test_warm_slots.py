"""Slots on demand, a bounded number warm: a sandbox is healthy before its slots start, keeps
``warm_slots`` free slots started in the order an executor leases them, refills them after
releases, and never hands out a warm slot holding anything of its last trajectory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from atropos_agent.executor.sandbox_client import HEALTH_TIMEOUT_S
from harness.servers import ExecutorServer, SandboxServer
from tests.executor_support import release, trajectory_info, wait_for
from tests.test_metrics import scrape

# A process a trajectory leaves behind, told apart from every other on this machine.
LINGERING = "sleep 301.4242"


def lingering() -> int:
    """How many processes of ``LINGERING`` run on this machine (in any slot)."""
    found = subprocess.run(["pgrep", "-fc", LINGERING], capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


def health(server: SandboxServer) -> dict[str, Any]:
    answer: dict[str, Any] = server.client.get("/health").json()
    return answer


def started(server: SandboxServer) -> set[str]:
    """Slots whose agent runs."""
    return {s["slot_id"] for s in server.client.get("/slots").json()["slots"] if s["alive"]}


def warm(server: SandboxServer) -> set[str]:
    return {s["slot_id"] for s in server.client.get("/slots").json()["slots"] if s["warm"]}


def settled(server: SandboxServer, warm_slots: set[str]) -> Callable[[], bool]:
    """A probe: the sandbox's warm slots are ``warm_slots`` and no other slot is started
    beyond the leased ones."""
    return lambda: warm(server) == warm_slots


def test_a_sandbox_is_healthy_before_its_slots_start_and_keeps_a_few_warm(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    server = sandbox_factory(slots=16, env={"ATROPOS_SANDBOX_WARM_SLOTS": "2"})
    first = health(server)
    assert first["warm_target"] == 2
    assert first["cold_slots"] >= 14  # healthy with at most the warm ones started
    wait_for(settled(server, {"slot_0", "slot_1"}), 10, "slot_0 and slot_1 warm")
    time.sleep(0.3)  # the warmer has nothing more to start: no other agent appears
    assert started(server) == {"slot_0", "slot_1"}
    counts = health(server)
    assert (counts["warm_slots"], counts["cold_slots"], counts["leased_slots"]) == (2, 14, 0)

    # A call on a cold slot starts it on demand; it is no longer free.
    assert server.sh("slot_9", "echo cold")["output"].strip() == "cold"
    counts = health(server)
    assert (counts["warm_slots"], counts["cold_slots"], counts["leased_slots"]) == (2, 13, 1)

    # A warm slot taken: the next cold one in line is warmed in its place.
    assert server.sh("slot_0", "echo warm")["success"]
    wait_for(settled(server, {"slot_1", "slot_2"}), 10, "slot_2 warmed in slot_0's place")

    # A reset slot goes to the front of the line: warmed first, and the last warm slot in
    # line is stopped so that no more than two stay warm.
    assert server.client.post("/reset", json={"slot_id": "slot_9"}).status_code == 200
    wait_for(settled(server, {"slot_9", "slot_1"}), 10, "slot_9 warm, slot_2 cooled")
    assert started(server) == {"slot_0", "slot_1", "slot_9"}

    metrics = scrape(server.client)
    readiness = "atropos_sandbox_slot_readiness"
    assert metrics.value(readiness, state="warm") == 2
    assert metrics.value(readiness, state="leased") == 1  # slot_0
    assert metrics.value(readiness, state="cold") == 13


def test_a_reset_slot_is_warm_only_once_wiped_and_started_anew(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    server = sandbox_factory(slots=2, env={"ATROPOS_SANDBOX_WARM_SLOTS": "1"})
    wait_for(settled(server, {"slot_0"}), 10, "slot_0 warm")
    assert server.run("slot_0", "python_stateful", code="secret = 41")["success"]
    assert server.run("slot_0", "terminal_stateful", command="export MINE=1")["success"]
    left = f"echo mine > kept.txt; echo tmp > /tmp/t; {LINGERING} &"
    assert server.sh("slot_0", left)["success"]
    assert lingering() == 1
    before = {s["slot_id"]: s["pid"] for s in server.client.get("/slots").json()["slots"]}
    assert server.client.post("/reset", json={"slot_id": "slot_0"}).status_code == 200
    assert lingering() == 0  # killed by the reset itself
    # Warmed first (it is next in line), and slot_1, warmed meanwhile, is stopped again.
    wait_for(lambda: started(server) == warm(server) == {"slot_0"}, 10, "slot_0 alone warm")
    slots = {s["slot_id"]: s for s in server.client.get("/slots").json()["slots"]}
    assert slots["slot_0"]["pid"] != before["slot_0"]  # a new agent
    assert slots["slot_0"]["owner"] is None
    listing = server.sh("slot_0", "ls -A /workspace /tmp")["output"].split()
    assert listing == ["/tmp:", "/workspace:"], listing
    shell = server.run("slot_0", "terminal_stateful", command="echo env=${MINE:-}")
    assert shell["output"].strip() == "env=", shell
    gone = server.run("slot_0", "python_stateful", code="print(secret)")
    assert not gone["success"] and "NameError" in gone["output"] + gone["error"], gone


def test_with_no_warm_slots_every_slot_starts_on_demand(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    server = sandbox_factory(slots=4, env={"ATROPOS_SANDBOX_WARM_SLOTS": "0"})
    counts = health(server)
    assert (counts["warm_slots"], counts["cold_slots"], counts["warm_target"]) == (0, 4, 0)
    assert server.sh("slot_3", "echo on demand")["output"].strip() == "on demand"
    assert started(server) == {"slot_3"}
    assert server.client.post("/reset", json={"slot_id": "slot_3"}).status_code == 200
    time.sleep(0.3)  # nothing starts it again before a call does
    assert started(server) == set()
    assert server.sh("slot_3", "ls -A /workspace | wc -l")["output"].strip() == "0"


def sandbox_health(server: ExecutorServer) -> dict[str, Any]:
    """``/health`` of the executor's one sandbox (open without a token)."""
    (child,) = server.status()["pool"]["backend"]["children"]
    answer: dict[str, Any] = httpx.get(f"http://127.0.0.1:{child['port']}/health").json()
    return answer


def readiness(server: ExecutorServer) -> dict[str, int]:
    states: dict[str, int] = server.status()["pool"]["slots_by_readiness"]
    return states


def test_an_executor_leases_warm_slots_first_and_they_come_back_clean(
    executor_factory: Callable[..., ExecutorServer],
) -> None:
    server = executor_factory(
        env={
            "TOOL_EXECUTOR_SLOTS": "4",
            "TOOL_EXECUTOR_WARM_SLOTS": "2",
            "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
            "TOOL_EXECUTOR_MAX_CONTAINERS": "1",
        }
    )
    wait_for(lambda: readiness(server) == {"warm": 2, "cold": 2, "leased": 0}, 10, "2 warm")

    # Every slot leased: none free, so none warm.
    trajectories = [f"t{i}" for i in range(4)]
    for trajectory in trajectories:
        assert server.sh(trajectory, "echo leased")["success"]
    assert readiness(server) == {"warm": 0, "cold": 0, "leased": 4}
    status = server.status()["pool"]
    assert status["per_sandbox"][0]["warm_slots"] == 0
    metrics = scrape(server.client)
    assert metrics.value("atropos_executor_slot_readiness", state="leased") == 4
    assert metrics.value("atropos_executor_slot_readiness", state="warm") == 0

    # t0 leaves files, a process, a variable, an environment; released last, its slot is the
    # first in line: warmed again, and leased first.
    held = trajectory_info(server, "t0")
    assert held is not None
    left = f"echo secret > a.txt; echo t > /tmp/t; {LINGERING} &"
    assert server.sh("t0", left)["success"]
    assert server.call("t0", "python_stateful", code="secret = 41")["success"]
    assert server.call("t0", "terminal_stateful", command="export MINE=1")["success"]
    assert lingering() == 1
    release(server, "t1", "t2", "t3", "t0")
    assert lingering() == 0
    wait_for(lambda: sandbox_health(server)["warm_slots"] == 2, 10, "warm slots refilled")
    wait_for(lambda: readiness(server) == {"warm": 2, "cold": 2, "leased": 0}, 10, "status")
    metrics = scrape(server.client)
    assert metrics.value("atropos_executor_slot_readiness", state="warm") == 2
    assert metrics.value("atropos_executor_slot_readiness", state="cold") == 2

    fresh = server.sh("new", "ls -A /workspace /tmp")
    new = trajectory_info(server, "new")
    assert new is not None and new["slot_id"] == held["slot_id"]
    assert fresh["output"].split() == ["/tmp:", "/workspace:"], fresh
    shell = server.call("new", "terminal_stateful", command="echo env=${MINE:-}")
    assert shell["output"].strip() == "env=", shell
    gone = server.call("new", "python_stateful", code="print(secret)")
    assert not gone["success"], gone


def test_a_burst_on_cold_slots_leaves_the_server_answering_its_health_checks(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    """Agents start a few per core at once, whoever starts them: 48 first calls on cold slots
    at once neither fail nor keep ``/health`` from answering within the executor's timeout."""
    slots = 48
    server = sandbox_factory(slots=slots, env={"ATROPOS_SANDBOX_WARM_SLOTS": "0"})
    with ThreadPoolExecutor(slots) as pool:
        calls = [pool.submit(server.sh, f"slot_{n}", f"echo {n}") for n in range(slots)]
        slowest = 0.0
        while not all(call.done() for call in calls):
            began = time.monotonic()
            assert server.client.get("/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.05)
        outputs = [call.result()["output"].strip() for call in calls]
    assert outputs == [str(n) for n in range(slots)]
    assert slowest < HEALTH_TIMEOUT_S
