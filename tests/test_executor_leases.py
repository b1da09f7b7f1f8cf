"""The real executor with real sandboxes: isolation between trajectories, order within one,
long and slow commands, release, and pool scaling.

A 40 s command is started when this module starts and checked by its last test, so that it
runs while the other tests do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from harness.servers import ExecutorServer, start_executor
from tests.executor_support import (
    Background,
    background_sh,
    execute,
    local_backend_only,
    new_client,
    pid_alive,
    release,
    sandbox_ids,
    settings,
    trajectory_info,
    wait_for,
    wait_in_flight,
)

Factory = Callable[..., ExecutorServer]

LONG_TRAJECTORY = "long-40s"


@pytest.fixture(scope="module")
def executor() -> Iterator[ExecutorServer]:
    """The shared executor of this module: 1..2 sandboxes of 4 slots."""
    server = start_executor(env=settings())
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def long_call(executor: ExecutorServer) -> Iterator[Background]:
    """``sleep 40`` with ``timeout_s=60``, running in the background through the whole module."""
    call = background_sh(executor, LONG_TRAJECTORY, "sleep 40; echo done", timeout_s=60)
    wait_in_flight(executor, LONG_TRAJECTORY, 1)
    yield call


# ---- order within a trajectory


def test_execute_batch_runs_calls_of_one_trajectory_in_request_order(
    executor: ExecutorServer,
) -> None:
    trajectory = "order-batch"
    calls = [
        {
            "trajectory_id": trajectory,
            "tool": {
                "name": "terminal",
                "arguments": {"command": f"echo {i} >> order.txt; echo {i}"},
                "uniq_id": f"call-{i}",
            },
        }
        for i in range(20)
    ]
    try:
        response = executor.client.post("/execute_batch", json={"calls": calls})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["uniq_id"] for r in results] == [f"call-{i}" for i in range(20)]
        assert [r["output"] for r in results] == [f"{i}" for i in range(20)]
        assert all(r["success"] for r in results), results
        content = executor.sh(trajectory, "cat order.txt")
        assert content["output"].split() == [str(i) for i in range(20)]
    finally:
        release(executor, trajectory)


def test_concurrent_calls_of_one_trajectory_run_in_submission_order(
    executor: ExecutorServer,
) -> None:
    trajectory = "order-threads"
    calls: list[Background] = []
    try:
        # A first call holds the trajectory while the others are submitted, one after another.
        blocker = background_sh(executor, trajectory, "sleep 2; echo B >> order.txt")
        wait_in_flight(executor, trajectory, 1)
        for i in range(5):
            calls.append(background_sh(executor, trajectory, f"echo {i} >> order.txt; echo {i}"))
            # Submitted in a known order: the next one goes only once this one is queued.
            wait_in_flight(executor, trajectory, i + 2)
        assert blocker.result()["success"]
        for i, call in enumerate(calls):
            result = call.result()
            assert result["success"], result
            assert result["output"] == f"{i}"
        content = executor.sh(trajectory, "cat order.txt")
        assert content["output"].split() == ["B", "0", "1", "2", "3", "4"]
    finally:
        release(executor, trajectory)


# ---- slow commands do not hold up other trajectories


def test_a_sleeping_trajectory_does_not_delay_another(executor: ExecutorServer) -> None:
    sleeper, other = "slow-sleeper", "slow-other"
    try:
        slow = background_sh(executor, sleeper, "sleep 5; echo slept")
        wait_in_flight(executor, sleeper, 1)
        started = time.monotonic()
        quick = executor.sh(other, "echo quick")
        elapsed = time.monotonic() - started
        assert quick["success"] and quick["output"] == "quick", quick
        assert elapsed < 1.0, f"echo took {elapsed:.2f}s while another trajectory slept"
        assert slow.finished_at is None, "the sleep should still be running"
        slept = slow.result()
        assert slept["success"] and slept["output"] == "slept", slept
        # Both ran on the same sandbox, so it is not the pool that kept them apart.
        assert slept["metadata"]["sandbox_id"] == quick["metadata"]["sandbox_id"]
        assert slept["metadata"]["slot_id"] != quick["metadata"]["slot_id"]
    finally:
        release(executor, sleeper, other)


def test_calls_batched_together_are_answered_as_each_finishes(executor: ExecutorServer) -> None:
    sleeper, other = "batch-sleeper", "batch-other"
    before = {s["sandbox_id"]: s for s in executor.status()["pool"]["per_sandbox"]}
    calls = [
        {
            "trajectory_id": sleeper,
            "tool": {"name": "terminal", "arguments": {"command": "sleep 5; date +%s.%N"}},
        },
        {
            "trajectory_id": other,
            "tool": {"name": "terminal", "arguments": {"command": "date +%s.%N | tee stamp"}},
        },
    ]
    try:
        submitted_wall = time.time()
        submitted = time.monotonic()

        def send_batch() -> Any:
            with new_client(executor) as client:
                return client.post("/execute_batch", json={"calls": calls})

        batch = Background(send_batch)

        def other_done() -> dict[str, Any] | None:
            # Readable only once the other trajectory's call is over (artifacts wait for it).
            response = executor.client.post(
                "/artifacts/read", json={"trajectory_id": other, "path": "stamp"}
            )
            answer: dict[str, Any] = response.json()
            return answer if response.status_code == 200 and answer["success"] else None

        stamp = wait_for(other_done, 10, "the quick call of the batch", interval_s=0.02)
        answered_after = time.monotonic() - submitted
        assert answered_after < 1.0, f"quick call done only after {answered_after:.2f}s"
        assert batch.finished_at is None, "the sleep should still be running"
        response = batch.result()
        assert response.status_code == 200, response.text
        slept, quick = response.json()["results"]
        assert slept["success"] and quick["success"], (slept, quick)
        assert quick["output"] == stamp["content"].strip()
        # Inside the sandbox, the quick command ran at once, not after the sleep.
        assert float(quick["output"]) - submitted_wall < 1.0
        assert float(slept["output"]) - float(quick["output"]) > 4.0
        # The two calls went to the same sandbox in one batch.
        sandbox = slept["metadata"]["sandbox_id"]
        assert quick["metadata"]["sandbox_id"] == sandbox
        after = {s["sandbox_id"]: s for s in executor.status()["pool"]["per_sandbox"]}
        assert after[sandbox]["calls"] - before[sandbox]["calls"] == 2
        assert after[sandbox]["batches"] - before[sandbox]["batches"] == 1
    finally:
        release(executor, sleeper, other)


# ---- release


def test_release_of_unknown_trajectory_is_404(executor: ExecutorServer) -> None:
    response = executor.client.post("/release", json={"trajectory_id": "never-seen"})
    assert response.status_code == 404
    assert "never-seen" in response.json()["error"]


def test_release_waits_for_the_running_call(executor: ExecutorServer) -> None:
    trajectory = "release-busy"
    leased_before = executor.status()["pool"]["leased_slots"]
    call = background_sh(executor, trajectory, "sleep 2; echo finished > done.txt; echo ok")
    wait_in_flight(executor, trajectory, 1)
    started = time.monotonic()
    releasing = Background(
        lambda: executor.client.post("/release", json={"trajectory_id": trajectory})
    )
    time.sleep(0.5)
    # A call sent while the release waits runs after it, as the start of a new lease.
    after = background_sh(executor, trajectory, "ls -A /workspace; echo after")
    response = releasing.result()
    waited = (releasing.finished_at or 0) - started
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    result = call.result()
    assert result["success"] and result["output"] == "ok", result
    assert waited > 1.0, f"release returned after {waited:.2f}s, before the call ended"
    fresh = after.result()
    assert fresh["success"] and fresh["output"] == "after", fresh

    # That new lease is a lease like any other: listed, released, its slot given back.
    info = trajectory_info(executor, trajectory)
    assert info is not None and info["slot_id"] == fresh["metadata"]["slot_id"], info
    assert info["calls"] == 1
    response = executor.client.post("/release", json={"trajectory_id": trajectory})
    assert response.json() == {"status": "ok", "released": True}
    assert trajectory_info(executor, trajectory) is None
    assert executor.status()["pool"]["leased_slots"] == leased_before


# ---- many trajectories at once


def test_concurrent_trajectories_see_only_their_own_workspace(
    executor_factory: Factory,
) -> None:
    server = executor_factory(env=settings(slots="4", min_containers="1", max_containers="4"))
    names = [f"iso-{i:02d}" for i in range(12)]
    barrier = threading.Barrier(len(names))

    def round_trip(name: str, command: str) -> dict[str, Any]:
        with new_client(server) as client:
            barrier.wait(30)
            return execute(client, name, command)

    writes = [
        Background(partial(round_trip, name, f"echo {name} > {name}.txt; ls /workspace"))
        for name in names
    ]
    first = [call.result() for call in writes]
    for name, result in zip(names, first, strict=True):
        assert result["success"], result
        assert result["output"] == f"{name}.txt", (name, result)
    places = {(r["metadata"]["sandbox_id"], r["metadata"]["slot_id"]) for r in first}
    assert len(places) == len(names), "two trajectories shared a slot"
    assert len({sandbox for sandbox, _ in places}) >= 3
    assert server.status()["pool"]["leased_slots"] == len(names)

    reads = [Background(partial(round_trip, name, "cat *.txt; ls -A /workspace")) for name in names]
    for name, call, before in zip(names, reads, first, strict=True):
        result = call.result()
        assert result["success"], result
        assert result["output"] == f"{name}\n{name}.txt", (name, result)
        assert result["metadata"]["slot_id"] == before["metadata"]["slot_id"]
        assert result["metadata"]["sandbox_id"] == before["metadata"]["sandbox_id"]
    release(server, *names)
    assert server.status()["pool"]["leased_slots"] == 0


# ---- scaling of the local backend


@local_backend_only
def test_pool_grows_under_load_and_shrinks_around_held_leases(
    executor_factory: Factory,
) -> None:
    server = executor_factory(
        env=settings(slots="2", min_containers="1", max_containers="3", scale_down_idle_s="2")
    )
    assert len(sandbox_ids(server)) == 1
    names = [f"grow-{i}" for i in range(5)]
    barrier = threading.Barrier(len(names))

    def lease(name: str) -> dict[str, Any]:
        with new_client(server) as client:
            barrier.wait(30)
            return execute(client, name, f"echo {name} > mine.txt; cat mine.txt")

    calls = [Background(partial(lease, name)) for name in names]
    results = {name: call.result() for name, call in zip(names, calls, strict=True)}
    for name, result in results.items():
        assert result["success"], result
        assert result["output"] == f"{name}"
    ids = sandbox_ids(server)
    assert len(ids) == 3
    children = server.status()["pool"]["backend"]["children"]
    assert len(children) == 3
    pids = {child["sandbox_id"]: child["pid"] for child in children}

    on: dict[str, list[str]] = {sandbox: [] for sandbox in ids}
    for name, result in results.items():
        on[result["metadata"]["sandbox_id"]].append(name)
    assert all(on.values()), f"every sandbox should hold a lease: {on}"
    keep_low, keep_mid = on[ids[0]][0], on[ids[1]][0]
    release(server, *(n for n in names if n not in (keep_low, keep_mid)))

    # The highest sandbox goes; the middle one holds a lease, so it stays.
    wait_for(lambda: len(sandbox_ids(server)) == 2, 30, "the pool to shrink to 2")
    assert sandbox_ids(server) == ids[:2]
    assert not pid_alive(pids[ids[2]])
    time.sleep(3)  # longer than the scale-down quiet period: still no further shrink
    assert sandbox_ids(server) == ids[:2]
    for name, sandbox in ((keep_low, ids[0]), (keep_mid, ids[1])):
        result = server.sh(name, "cat mine.txt")
        assert result["success"] and result["output"] == f"{name}", result
        assert result["metadata"]["sandbox_id"] == sandbox

    release(server, keep_mid)
    wait_for(lambda: len(sandbox_ids(server)) == 1, 30, "the pool to shrink to 1")
    assert sandbox_ids(server) == ids[:1]
    assert not pid_alive(pids[ids[1]])
    assert [c["sandbox_id"] for c in server.status()["pool"]["backend"]["children"]] == ids[:1]
    result = server.sh(keep_low, "cat mine.txt")
    assert result["success"] and result["output"] == f"{keep_low}", result
    assert result["metadata"]["sandbox_id"] == ids[0]
    release(server, keep_low)


# ---- the long command (started with the module)


def test_forty_second_command_succeeds_with_long_timeout(long_call: Background) -> None:
    result = long_call.result(timeout_s=90)
    assert result["success"], result
    assert long_call.finished_at is not None
    assert long_call.finished_at - long_call.started_at >= 40
    assert result["output"] == "done"
    assert result["metadata"]["duration_ms"] >= 40_000
