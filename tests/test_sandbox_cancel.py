"""``POST /cancel`` through the real server: the running call of one slot stops at once, with the
kill a timeout makes; calls queued behind it, and other slots, go on as they would."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from atropos_agent.sandbox.agent.results import CANCELLED
from harness.processes import host_processes_matching, unique_sleep
from harness.servers import SandboxServer
from tests.executor_support import wait_for

LONG_S = 60.0


def running(command: str) -> Callable[[], bool]:
    return lambda: bool(host_processes_matching(command))


def cancel(sandbox: SandboxServer, slot: str) -> tuple[dict[str, Any], float]:
    """The answer of ``POST /cancel``, and how long it took."""
    started = time.monotonic()
    response = sandbox.client.post("/cancel", json={"slot_id": slot})
    assert response.status_code == 200, response.text
    return response.json(), time.monotonic() - started


def assert_cancelled(result: dict[str, Any]) -> None:
    assert result["success"] is False, result
    assert result["error"].startswith(CANCELLED), result
    assert result["metadata"]["cancelled"] is True, result


@pytest.fixture
def background() -> Any:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_cancel_stops_a_running_command_at_once(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    sleep = unique_sleep()
    call: Future[dict[str, Any]] = background.submit(
        sandbox.sh, "slot_0", f"echo started; {sleep}; echo never", LONG_S
    )
    wait_for(running(sleep), 10, sleep)

    answer, took = cancel(sandbox, "slot_0")
    assert answer == {"slot_id": "slot_0", "cancelled": True}
    assert took < 1.5, took
    result = call.result(timeout=2)  # answered by the time /cancel was
    assert_cancelled(result)
    assert result["output"] == "started"  # what it printed before the kill is kept
    assert result["metadata"]["exit_code"] == -1
    assert result["metadata"]["slot_id"] == "slot_0"
    assert "timed_out" not in result["metadata"]
    assert host_processes_matching(sleep) == []

    after = sandbox.sh("slot_0", "echo next")
    assert after["success"] and after["output"] == "next", after
    assert "slot_restarted" not in after["metadata"]


def test_cancel_kills_orphans_too(sandbox: SandboxServer, background: ThreadPoolExecutor) -> None:
    sleep = unique_sleep()
    # A daemon double-forked by the command, as a timeout finds it: re-parented to the agent.
    command = f"(setsid {sleep} >/dev/null 2>&1 &); sleep {LONG_S}"
    call = background.submit(sandbox.sh, "slot_0", command, LONG_S)
    wait_for(running(sleep), 10, sleep)
    assert cancel(sandbox, "slot_0")[0]["cancelled"] is True
    assert_cancelled(call.result(timeout=2))
    assert host_processes_matching(sleep) == []


def test_cancel_of_an_idle_slot_changes_nothing(sandbox: SandboxServer) -> None:
    answer, _ = cancel(sandbox, "slot_1")
    assert answer == {"slot_id": "slot_1", "cancelled": False}
    # The next calls get their own answers: the frame stream is in step.
    for number in range(3):
        result = sandbox.sh("slot_1", f"echo {number}")
        assert result["success"] and result["output"] == str(number), result


def test_cancel_leaves_queued_calls_of_the_slot_alone(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    sleep = unique_sleep()
    items = [
        {"slot_id": "slot_2", "tool": "terminal", "args": {"command": sleep}, "timeout": LONG_S},
        {"slot_id": "slot_2", "tool": "terminal", "args": {"command": "echo queued"}},
    ]

    def stream() -> dict[int, dict[str, Any]]:
        with sandbox.client.stream("POST", "/batch/stream", json=items) as response:
            assert response.status_code == 200
            return {line["index"]: line for line in map(json.loads, response.iter_lines())}

    lines = background.submit(stream)
    wait_for(running(sleep), 10, sleep)
    assert cancel(sandbox, "slot_2")[0]["cancelled"] is True
    answers = lines.result(timeout=5)
    assert_cancelled(answers[0])
    assert answers[1]["success"] is True and answers[1]["output"] == "queued", answers[1]


def test_cancel_never_touches_another_slot(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    sleep = unique_sleep()
    other = background.submit(sandbox.sh, "slot_1", "sleep 1.5; echo survived", LONG_S)
    call = background.submit(sandbox.sh, "slot_3", sleep, LONG_S)
    wait_for(running(sleep), 10, sleep)
    assert cancel(sandbox, "slot_3")[0]["cancelled"] is True
    assert_cancelled(call.result(timeout=2))
    survived = other.result(timeout=10)
    assert survived["success"] and survived["output"] == "survived", survived
    assert "cancelled" not in survived["metadata"]


def test_cancel_of_the_stateful_shell_restarts_it_as_a_timeout_does(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    def stateful(command: str) -> dict[str, Any]:
        return sandbox.run("slot_0", "terminal_stateful", timeout=LONG_S, command=command)

    assert stateful("KEPT=yes; cd /tmp")["success"]
    sleep = unique_sleep()
    call = background.submit(stateful, f"echo $KEPT; {sleep}")
    wait_for(running(sleep), 10, sleep)
    assert cancel(sandbox, "slot_0")[0]["cancelled"] is True
    result = call.result(timeout=2)
    assert_cancelled(result)
    assert result["output"] == "yes"
    assert result["error"].endswith("the stateful shell was restarted, its state is lost")
    assert result["metadata"]["stateful"] is True
    assert host_processes_matching(sleep) == []

    fresh = stateful("echo [$KEPT] $PWD")
    assert fresh["success"] and fresh["output"] == "[] /workspace", fresh
    assert fresh["metadata"]["shell_restarted"] is True


def test_cancel_of_python_kills_what_it_started(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    sleep = unique_sleep()
    code = (
        "import subprocess, time\n"
        f"subprocess.Popen({sleep.split()!r})\n"
        "print('py started', flush=True)\n"
        "time.sleep(60)\n"
    )
    call = background.submit(sandbox.run, "slot_1", "python", LONG_S, code=code)
    wait_for(running(sleep), 10, sleep)
    assert cancel(sandbox, "slot_1")[0]["cancelled"] is True
    result = call.result(timeout=2)
    assert_cancelled(result)
    assert result["output"] == "py started"
    assert host_processes_matching(sleep) == []
    assert sandbox.run("slot_1", "python", code="print(6 * 7)")["output"] == "42"


def test_cancel_of_a_blocking_tmux_wait_stops_the_wait_only(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    slot = "slot_2"
    assert sandbox.run(slot, "tmux", action="start")["success"]
    try:
        sleep = unique_sleep()
        call = background.submit(
            sandbox.run, slot, "tmux", LONG_S, action="send_keys", keys=sleep, block=True
        )
        wait_for(running(sleep), 10, sleep)
        assert cancel(sandbox, slot)[0]["cancelled"] is True
        result = call.result(timeout=2)
        assert_cancelled(result)
        assert "the keys were sent" in result["error"]
        # The command the keys started is the session's: it runs on, C-c stops it.
        assert host_processes_matching(sleep) != []
        assert sandbox.run(slot, "tmux", action="send_keys", keys="C-c")["success"]
        wait_for(lambda: not host_processes_matching(sleep), 10, f"{sleep} to end")
    finally:
        sandbox.run(slot, "tmux", action="stop")


def test_cancel_of_a_tmux_pause_ends_it(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    slot = "slot_3"
    assert sandbox.run(slot, "tmux", action="start")["success"]
    try:
        started = time.monotonic()
        call = background.submit(
            sandbox.run, slot, "tmux", LONG_S, action="send_keys", keys="true", min_wait_s=30
        )

        def busy() -> bool:
            slots = sandbox.client.get("/slots").json()["slots"]
            return bool(slots[3]["busy"])

        wait_for(busy, 10, f"{slot} to be busy")
        time.sleep(0.2)  # into the pause
        assert cancel(sandbox, slot)[0]["cancelled"] is True
        assert_cancelled(call.result(timeout=2))
        assert time.monotonic() - started < 10
    finally:
        sandbox.run(slot, "tmux", action="stop")
