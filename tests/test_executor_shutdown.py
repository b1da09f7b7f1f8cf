"""SIGTERM ends the executor within its bound, and calls in flight end with a clear error.

Calls still running when the grace (``TOOL_EXECUTOR_SHUTDOWN_GRACE_S``) ends are answered
``shutting_down`` / ``retryable``; the process exits within ``TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S``
of the signal and leaves no process of those calls behind. Both ways of serving behave alike.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from harness.servers import ExecutorServer, start_executor

# A command no other test runs, to find its processes.
SLEEPER = "sleep 20.5"
GRACE_S = 1.5
TIMEOUT_S = 4.5
BOUNDS = {
    "TOOL_EXECUTOR_SHUTDOWN_GRACE_S": str(GRACE_S),
    "TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S": str(TIMEOUT_S),
}
STARTERS: dict[str, Callable[[], ExecutorServer]] = {
    "serve": lambda: start_executor(env=BOUNDS),
    "uvicorn": lambda: start_executor(env=BOUNDS, app_path="atropos_agent.executor.app:app"),
}


def processes_running(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("served_by", sorted(STARTERS))
def test_sigterm_answers_calls_in_flight_and_exits_within_the_bound(served_by: str) -> None:
    server = STARTERS[served_by]()
    answers: list[Any] = []

    def call(index: int) -> None:
        body = {
            "trajectory_id": f"shutdown-{index}",
            "tool": {"name": "terminal", "arguments": {"command": SLEEPER}},
        }
        try:
            answers.append(server.client.post("/execute", json=body, timeout=60))
        except httpx.TransportError as exc:
            answers.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(processes_running(SLEEPER)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes_running(SLEEPER)) == 2

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        answered_after = time.monotonic() - signalled
        server.process.wait(30)
        exited_after = time.monotonic() - signalled
    finally:
        server.stop()

    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["success"] is False
        assert result["metadata"]["shutting_down"] is True
        assert result["metadata"]["retryable"] is True
        assert result["metadata"]["error_kind"] == "sandbox_error"
        assert "shut down while this call ran" in result["error"]
    assert GRACE_S - 0.2 < answered_after < GRACE_S + 1.5
    assert exited_after < TIMEOUT_S + 0.5
    assert processes_running(SLEEPER) == []
    assert "event=calls_ended_by_shutdown count=2" in server.log()


def test_an_idle_executor_stops_at_once() -> None:
    server = start_executor(env=BOUNDS)
    assert server.sh("idle-stop", "true")["success"]
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    exited_after = time.monotonic() - signalled
    server.stop()
    assert exited_after < 2.5


def test_a_shutdown_that_overruns_its_bound_ends_the_process() -> None:
    """The last resort, when stopping hangs: the process exits at the bound regardless."""
    program = textwrap.dedent(
        """
        import time
        from atropos_agent.serving import ExitDeadline
        ExitDeadline(0.3).start()
        time.sleep(30)
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 1
    assert time.monotonic() - started < 5
    assert "event=shutdown_overran bound_s=0.3" in done.stderr


def test_shutdown_bounds_that_leave_no_time_to_stop_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "atropos_agent.cli", "serve", "--port", "0"],
        env={
            "PATH": "/usr/bin:/bin",
            "TOOL_EXECUTOR_SHUTDOWN_GRACE_S": "5",
            "TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S": "4",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "TOOL_EXECUTOR_SHUTDOWN_GRACE_S (5) must be less than" in done.stderr
