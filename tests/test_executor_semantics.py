"""What a trainer running many rollouts relies on: a retried call runs once, a call can be
cancelled (by /cancel or by leaving), leases end at their lifetime, a group is released in one
call, and every failure says its kind and whether a retry can help."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness.processes import host_processes_matching
from harness.servers import ExecutorServer, start_executor
from tests.executor_support import (
    Background,
    new_client,
    release,
    settings,
    trajectory_info,
    wait_for,
    wait_in_flight,
)


@pytest.fixture(scope="module")
def service() -> Iterator[ExecutorServer]:
    """Room for a group of 50: two sandboxes of 32 slots."""
    server = start_executor(
        env=settings(slots="32", min_containers="2", max_containers="2", acquire_timeout_s="5")
    )
    yield server
    server.stop()


def call(
    server: ExecutorServer,
    trajectory: str,
    command: str,
    uniq_id: str | None = None,
    client: httpx.Client | None = None,
    **body: Any,
) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": "terminal", "arguments": {"command": command}}
    if uniq_id is not None:
        tool["uniq_id"] = uniq_id
    response = (client or server.client).post(
        "/execute", json={"trajectory_id": trajectory, "tool": tool, **body}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def lines_of(server: ExecutorServer, trajectory: str, path: str) -> list[str]:
    read = server.client.post("/artifacts/read", json={"trajectory_id": trajectory, "path": path})
    assert read.json()["success"], read.text
    return list(read.json()["content"].splitlines())


# ---- a retried call runs once


def test_a_call_retried_while_it_runs_and_after_runs_once(service: ExecutorServer) -> None:
    command = "echo ran >> runs.txt; sleep 1; echo done"
    try:
        with new_client(service) as other:
            first = Background(lambda: call(service, "retry-a", command, "u-1", client=other))
            wait_in_flight(service, "retry-a", 1)
            while_running = call(service, "retry-a", command, "u-1")
            after = call(service, "retry-a", command, "u-1")
        original = first.result()
        assert original["success"] and original["output"] == "done"
        assert "replayed" not in original["metadata"]
        for replay in (while_running, after):
            assert replay["success"] and replay["output"] == "done"
            assert replay["metadata"]["replayed"] is True
            assert replay["uniq_id"] == "u-1"
        assert lines_of(service, "retry-a", "runs.txt") == ["ran"]

        # Another uniq_id is another call; a released trajectory forgets its calls.
        assert call(service, "retry-a", command, "u-2")["success"]
        assert lines_of(service, "retry-a", "runs.txt") == ["ran", "ran"]
        release(service, "retry-a")
        fresh = call(service, "retry-a", "cat runs.txt 2>/dev/null | wc -l", "u-1")
        assert fresh["output"] == "0" and "replayed" not in fresh["metadata"]
    finally:
        release(service, "retry-a")


def test_a_uniq_id_reused_for_another_call_runs_that_call(service: ExecutorServer) -> None:
    """Old trainers may reuse ids: only a repeat of the same call is answered again."""
    try:
        assert call(service, "reuse", "echo first", "same-id")["output"] == "first"
        second = call(service, "reuse", "echo second", "same-id")
        assert second["output"] == "second" and "replayed" not in second["metadata"]
    finally:
        release(service, "reuse")


def test_calls_without_a_uniq_id_each_run(service: ExecutorServer) -> None:
    try:
        for _ in range(2):
            assert call(service, "retry-b", "echo ran >> runs.txt")["success"]
        assert lines_of(service, "retry-b", "runs.txt") == ["ran", "ran"]
    finally:
        release(service, "retry-b")


# ---- cancellation


def test_a_client_that_disconnects_frees_the_trajectory_and_kills_the_command(
    service: ExecutorServer,
) -> None:
    marker = "sleep 30.31"
    try:
        with pytest.raises(httpx.ReadTimeout), new_client(service) as impatient:
            impatient.timeout = httpx.Timeout(1.0)
            call(service, "leaver", f"{marker}; echo finished", "u-leave", client=impatient)
        left = time.monotonic()
        nxt = call(service, "leaver", "echo next")
        assert nxt["success"] and nxt["output"] == "next"
        assert time.monotonic() - left < 1.5
        wait_for(lambda: not host_processes_matching(marker), 5, "the command to be killed")
        # Whoever retries the call learns that it was cancelled; it does not run again.
        retry = call(service, "leaver", f"{marker}; echo finished", "u-leave")
        assert retry["metadata"]["cancelled"] is True
        assert retry["metadata"]["replayed"] is True
        assert retry["metadata"]["error_kind"] == "cancelled"
    finally:
        release(service, "leaver")


def test_cancel_stops_the_running_call_and_those_queued(service: ExecutorServer) -> None:
    marker = "sleep 30.32"
    try:
        running = Background(lambda: call(service, "cancelled", marker, "u-run"))
        wait_in_flight(service, "cancelled", 1)
        queued = Background(lambda: call(service, "cancelled", "echo queued", "u-queued"))
        wait_in_flight(service, "cancelled", 2)
        wait_for(lambda: bool(host_processes_matching(marker)), 10, "the command to start")
        answer = service.client.post("/cancel", json={"trajectory_id": "cancelled"})
        assert answer.status_code == 200
        assert sorted(answer.json()["cancelled"]) == ["u-queued", "u-run"]
        for background in (running, queued):
            result = background.result(10)
            assert result["success"] is False
            assert result["metadata"]["cancelled"] is True
            assert result["metadata"]["error_kind"] == "cancelled"
            assert result["metadata"]["retryable"] is False
        wait_for(lambda: not host_processes_matching(marker), 5, "the command to be killed")
        again = call(service, "cancelled", "echo again")
        assert again["success"] and again["output"] == "again"
        nothing = service.client.post("/cancel", json={"trajectory_id": "cancelled"}).json()
        assert nothing["cancelled"] == []
    finally:
        release(service, "cancelled")


def test_a_cancel_leaves_other_trajectories_alone(service: ExecutorServer) -> None:
    try:
        other = Background(lambda: call(service, "bystander", "sleep 1.5; echo fine"))
        mine = Background(lambda: call(service, "canceller", "sleep 30.33"))
        wait_in_flight(service, "canceller", 1)
        wait_in_flight(service, "bystander", 1)
        service.client.post("/cancel", json={"trajectory_id": "canceller"})
        assert mine.result(10)["metadata"]["cancelled"] is True
        assert other.result(10)["output"] == "fine"
    finally:
        release(service, "bystander", "canceller")


# ---- lifetimes and groups


def test_a_lease_ends_at_its_lifetime(service: ExecutorServer) -> None:
    try:
        first = call(service, "short-lived", "echo x > x.txt", lease_ttl_s=1.5)
        assert first["success"]
        info = trajectory_info(service, "short-lived")
        assert info is not None and 0 < info["expires_in_s"] <= 1.5
        time.sleep(2.5)
        ended = call(service, "short-lived", "cat x.txt")
        assert ended["success"] is False
        assert ended["metadata"]["error_kind"] == "lease_expired"
        assert "lifetime" in ended["error"]
        release(service, "short-lived")
        assert call(service, "short-lived", "echo fresh")["output"] == "fresh"
    finally:
        release(service, "short-lived")


def test_a_lease_taken_without_a_call_and_a_group_released_in_one_call(
    service: ExecutorServer,
) -> None:
    members = [f"group-{i}" for i in range(50)]
    try:
        for member in members:
            opened = service.client.post(
                "/trajectories", json={"trajectory_id": member, "group": "run-7"}
            )
            assert opened.status_code == 200, opened.text
            assert opened.json()["slot_id"] and opened.json()["group"] == "run-7"
        assert call(service, "group-0", "echo in-group")["success"]
        assert call(service, "not-in-group", "echo outside")["success"]
        listed = service.client.get("/trajectories", params={"group": "run-7", "limit": 1000})
        assert listed.json()["total"] == 50

        released = service.client.post("/release", json={"group": "run-7"})
        assert released.status_code == 200
        assert released.json() == {"status": "ok", "group": "run-7", "released": 50}
        listed = service.client.get("/trajectories", params={"group": "run-7"})
        assert listed.json()["total"] == 0
        assert trajectory_info(service, "not-in-group") is not None
    finally:
        release(service, "not-in-group", *members)


def test_release_names_one_trajectory_or_one_group(service: ExecutorServer) -> None:
    for body in ({}, {"trajectory_id": "a", "group": "g"}):
        answer = service.client.post("/release", json=body)
        assert answer.status_code == 422
        assert answer.json()["error_kind"] == "bad_request"


# ---- error kinds not caused above


def test_failures_say_their_kind(service: ExecutorServer) -> None:
    try:
        failed = call(service, "kinds", "exit 3")
        assert failed["metadata"]["error_kind"] == "tool_failed"
        assert failed["metadata"]["retryable"] is False
        slow = call(service, "kinds", "sleep 5", timeout_s=1)
        assert slow["metadata"]["error_kind"] == "timeout"
        unknown = service.client.post(
            "/execute", json={"trajectory_id": "kinds", "tool": {"name": "no-such-tool"}}
        ).json()
        assert unknown["metadata"]["error_kind"] == "bad_request"
        assert call(service, "kinds", "true")["metadata"].get("error_kind") is None
    finally:
        release(service, "kinds")


def test_a_disconnect_is_noticed_under_another_http_protocol_too() -> None:
    """Under uvicorn's h11 protocol (no connection callbacks of ours) a task watches instead."""
    server = start_executor(
        env=settings(slots="2", max_containers="1"),
        app_path="atropos_agent.executor.app:app",
        args=["--http", "h11"],
    )
    marker = "sleep 30.34"
    try:
        with pytest.raises(httpx.ReadTimeout), new_client(server) as impatient:
            impatient.timeout = httpx.Timeout(1.0)
            call(server, "h11-leaver", marker, client=impatient)
        wait_for(lambda: not host_processes_matching(marker), 5, "the command to be killed")
        assert call(server, "h11-leaver", "echo next")["output"] == "next"
    finally:
        server.stop()
