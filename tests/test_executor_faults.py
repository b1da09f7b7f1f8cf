"""The executor when things run short or go wrong: no free slot, idle expiry, release and
reset, a full queue, a killed sandbox, and SIGTERM to the executor itself.

Most tests share one small executor (one sandbox of two slots, acquire timeout 1 s, at most two
calls in the service); its last test stops it with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from harness.processes import host_processes_matching
from harness.servers import ExecutorServer, start_executor
from tests.executor_support import (
    local_backend_only,
    new_client,
    pid_alive,
    release,
    sandbox_ids,
    settings,
    wait_for,
)

Factory = Callable[..., ExecutorServer]


@pytest.fixture(scope="module")
def small() -> Iterator[ExecutorServer]:
    server = start_executor(
        env=settings(
            slots="2",
            min_containers="1",
            max_containers="1",
            acquire_timeout_s="1",
            max_queue="2",
        ),
    )
    yield server
    server.stop()


# ---- no free slot


def test_acquire_times_out_when_all_slots_are_leased(small: ExecutorServer) -> None:
    try:
        first = small.sh("full-a", "echo secret > secret.txt; echo a")
        second = small.sh("full-b", "echo b")
        assert first["success"] and second["success"], (first, second)
        assert small.status()["pool"]["free_slots"] == 0

        started = time.monotonic()
        refused = small.sh("full-c", "echo c")
        elapsed = time.monotonic() - started
        assert refused["success"] is False
        assert "no free slot" in refused["error"]
        assert "1s" in refused["error"]
        assert refused["metadata"]["acquire_timeout"] is True
        assert refused["metadata"]["error_kind"] == "no_slot"
        assert refused["metadata"]["retryable"] is True
        assert 0.9 <= elapsed < 3.0, f"the refusal took {elapsed:.2f}s"
        assert small.status()["pool"]["waiting_for_slot"] == 0

        # Released (without waiting for the reset): the waiting trajectory gets that slot,
        # only once it is wiped.
        response = small.client.post("/release", json={"trajectory_id": "full-a"})
        assert response.status_code == 200 and response.json()["status"] == "ok"
        third = small.sh("full-c", "ls -A /workspace; echo c")
        assert third["success"], third
        assert third["output"] == "c", "the released slot was handed over before its reset"
        assert third["metadata"]["slot_id"] == first["metadata"]["slot_id"]
    finally:
        release(small, "full-a", "full-b", "full-c")


def test_release_with_reset_workspace(small: ExecutorServer) -> None:
    try:
        holder = small.sh("reset-holder", "true")
        leased = small.sh("reset-a", "echo data > data.txt; mkdir d; touch d/x; echo ok")
        assert holder["success"] and leased["success"], (holder, leased)
        response = small.client.post(
            "/release", json={"trajectory_id": "reset-a", "reset_workspace": True}
        )
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        # The reset is done when the answer comes: the slot is already free again.
        assert small.status()["pool"]["free_slots"] == 1
        after = small.sh("reset-b", "ls -A /workspace; echo fresh")
        assert after["success"] and after["output"] == "fresh", after
        assert after["metadata"]["slot_id"] == leased["metadata"]["slot_id"]
    finally:
        release(small, "reset-holder", "reset-a", "reset-b")


# ---- queue bound


def test_full_queue_answers_503(small: ExecutorServer) -> None:
    names = [f"queue-{i}" for i in range(5)]
    barrier = threading.Barrier(len(names))
    responses: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        with new_client(small) as client:
            body = {
                "trajectory_id": name,
                "tool": {"name": "terminal", "arguments": {"command": "sleep 2; echo slow"}},
            }
            barrier.wait(10)
            responses[name] = client.post("/execute", json=body)

    threads = [threading.Thread(target=post, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        codes = sorted(r.status_code for r in responses.values())
        assert len(codes) == len(names)
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= len(names) - 2, codes
        assert codes.count(200) >= 1, codes
        for response in responses.values():
            if response.status_code == 503:
                assert response.headers["Retry-After"].isdigit()
                assert "limit 2" in response.json()["error"]
                assert response.json()["error_kind"] == "overloaded"
                assert response.json()["retryable"] is True
            else:
                assert response.json()["success"] is True
                assert response.json()["output"] == "slow"

        # A batch bigger than the bound is refused whole.
        calls = [
            {"trajectory_id": "queue-batch", "tool": {"name": "terminal", "arguments": {}}}
        ] * 3
        response = small.client.post("/execute_batch", json={"calls": calls})
        assert response.status_code == 503
        assert response.json()["error"]

        # Once the calls are done, the service takes calls again: the admitted trajectories'
        # next calls, and (once a slot is released) a refused one's retry.
        assert small.status()["queue_size"] == 0
        admitted = [name for name, r in responses.items() if r.status_code == 200]
        refused = [name for name, r in responses.items() if r.status_code == 503]
        for name in admitted:
            later = small.sh(name, "cat /dev/null; echo later")
            assert later["success"] and later["output"] == "later", later
        release(small, *admitted)
        retry = small.sh(refused[0], "echo retried")
        assert retry["success"] and retry["output"] == "retried", retry
    finally:
        release(small, *names)


# ---- a sandbox dies


@local_backend_only
def test_killed_sandbox_is_replaced_and_its_trajectories_told(small: ExecutorServer) -> None:
    try:
        victim = small.sh("lost-a", "echo mine > mine.txt; echo ok")
        assert victim["success"], victim
        old_sandbox = victim["metadata"]["sandbox_id"]
        status = small.status()
        lost_before = status["pool"]["lost_sandboxes"]
        children = status["pool"]["backend"]["children"]
        pid = next(c["pid"] for c in children if c["sandbox_id"] == old_sandbox)
        os.kill(pid, signal.SIGKILL)

        wait_for(
            lambda: small.status()["pool"]["lost_sandboxes"] > lost_before,
            15,
            "the pool to notice the killed sandbox",
        )
        lost = small.sh("lost-a", "cat mine.txt")
        assert lost["success"] is False
        assert "workspace lost" in lost["error"]
        assert lost["metadata"]["workspace_lost"] is True
        assert lost["metadata"]["error_kind"] == "workspace_lost"
        assert lost["metadata"]["retryable"] is False
        # It stays lost (not silently moved to a fresh slot) until released.
        again = small.sh("lost-a", "echo still")
        assert again["success"] is False and again["metadata"]["workspace_lost"] is True

        # The replacement comes up under a new id, with all-new slots.
        wait_for(
            lambda: any(s != old_sandbox for s in sandbox_ids(small)),
            60,
            "a replacement sandbox",
        )
        assert old_sandbox not in sandbox_ids(small)
        newcomer = small.sh("lost-b", "ls -A /workspace; echo new")
        assert newcomer["success"] and newcomer["output"] == "new", newcomer
        new_sandbox = newcomer["metadata"]["sandbox_id"]
        assert new_sandbox != old_sandbox
        assert small.client.get("/health").json()["status"] == "ok"

        response = small.client.post("/release", json={"trajectory_id": "lost-a"})
        assert response.status_code == 200 and response.json()["status"] == "ok"
        fresh = small.sh("lost-a", "ls -A /workspace; echo back")
        assert fresh["success"] and fresh["output"] == "back", fresh
        assert fresh["metadata"]["sandbox_id"] == new_sandbox
    finally:
        release(small, "lost-a", "lost-b")


# ---- SIGTERM (last: it stops the module's executor)


@local_backend_only
def test_sigterm_stops_every_sandbox_child(small: ExecutorServer) -> None:
    marker = f"pool-leftover-{uuid.uuid4().hex}"
    started = small.sh("term-holder", f"(exec -a {marker} sleep 300) > /dev/null 2>&1 & echo ok")
    assert started["success"], started
    wait_for(lambda: host_processes_matching(marker), 5, "the slot's background process")
    status = small.status()
    data_dir = status["pool"]["backend"]["data_dir"]
    pids = [child["pid"] for child in status["pool"]["backend"]["children"]]
    assert pids and all(pid_alive(pid) for pid in pids)
    # The sandbox servers and their slots' processes all name the pool's data dir.
    assert any("atropos_agent.sandbox" in p for p in host_processes_matching(data_dir))

    small.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert small.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in small.log()
    wait_for(
        lambda: not any(pid_alive(pid) for pid in pids) and not host_processes_matching(data_dir),
        10,
        "no process of the pool to remain",
    )
    assert not host_processes_matching(marker), "a slot's background process outlived the pool"


# ---- idle expiry (an executor of its own)


def test_idle_lease_expires(executor_factory: Factory) -> None:
    server = executor_factory(
        env=settings(slots="1", min_containers="1", max_containers="1", lease_idle_expiry_s="1")
    )
    first = server.sh("idle", "echo old > old.txt; echo ok")
    assert first["success"], first
    time.sleep(3)
    assert not [
        t
        for t in server.client.get("/trajectories").json()["trajectories"]
        if t["trajectory_id"] == "idle"
    ]
    assert server.status()["pool"]["leased_slots"] == 0

    expired = server.sh("idle", "cat old.txt")
    assert expired["success"] is False
    assert "expired" in expired["error"]
    assert expired["metadata"]["workspace_lost"] is True
    assert expired["metadata"]["error_kind"] == "lease_expired"
    # Told on every call until released, never silently given a fresh workspace.
    assert server.sh("idle", "true")["metadata"]["workspace_lost"] is True

    # The slot was reset: a new trajectory gets it, empty.
    newcomer = server.sh("idle-new", "ls -A /workspace; echo new")
    assert newcomer["success"] and newcomer["output"] == "new", newcomer
    assert newcomer["metadata"]["slot_id"] == first["metadata"]["slot_id"]
    assert newcomer["metadata"]["sandbox_id"] == first["metadata"]["sandbox_id"]
    release(server, "idle-new")

    response = server.client.post("/release", json={"trajectory_id": "idle"})
    assert response.status_code == 200 and response.json()["status"] == "ok"
    fresh = server.sh("idle", "ls -A /workspace; echo fresh")
    assert fresh["success"] and fresh["output"] == "fresh", fresh
