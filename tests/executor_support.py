"""Small helpers shared by the executor integration tests (tests/test_executor_*.py)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from harness.servers import DEFAULT_BACKEND, ExecutorServer

T = TypeVar("T")

# The executor suites run on the local backend, and again with TEST_BACKEND=nomad on the
# Nomad API double (harness/nomad_double); some tests are about local child processes.
local_backend_only = pytest.mark.skipif(
    DEFAULT_BACKEND != "local", reason="about the local backend's child processes"
)

# Slot uids must not be shared with other sandbox servers on this host (other test runs,
# benchmarks): a sandbox in isolation "none" kills every process of its slots' uids.
_UID_BLOCKS = itertools.count()


def settings(**values: str) -> dict[str, str]:
    """``TOOL_EXECUTOR_*`` settings for a test executor, with slot uids of its own."""
    block = next(_UID_BLOCKS)
    uid_base = 3_000_000 + (os.getpid() % 20_000) * 10_000 + block * 500
    env = {"TOOL_EXECUTOR_SANDBOX_SLOT_UID_BASE": str(uid_base)}
    env.update({f"TOOL_EXECUTOR_{name.upper()}": value for name, value in values.items()})
    return env


def new_client(server: ExecutorServer, token: str | None = None) -> httpx.Client:
    """A client of its own (one per thread), authenticated like ``server.client``."""
    token = token or server.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def execute(
    client: httpx.Client, trajectory: str, command: str, timeout_s: float | None = None
) -> dict[str, Any]:
    """``POST /execute`` of a terminal command; asserts HTTP 200 and returns the ToolResult."""
    body: dict[str, Any] = {
        "trajectory_id": trajectory,
        "tool": {"name": "terminal", "arguments": {"command": command}},
    }
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    response = client.post("/execute", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def release(server: ExecutorServer, *trajectories: str, reset: bool = True) -> None:
    """Release trajectories (waiting for their slots' reset); unknown ones are fine."""
    for trajectory in trajectories:
        response = server.client.post(
            "/release", json={"trajectory_id": trajectory, "reset_workspace": reset}
        )
        assert response.status_code in (200, 404), response.text


def wait_for(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def trajectory_info(server: ExecutorServer, trajectory: str) -> dict[str, Any] | None:
    """The trajectory's entry in ``GET /trajectories``, or None."""
    listing = server.client.get("/trajectories", params={"limit": 1000}).json()
    for entry in listing["trajectories"]:
        if entry["trajectory_id"] == trajectory:
            found: dict[str, Any] = entry
            return found
    return None


def wait_in_flight(server: ExecutorServer, trajectory: str, count: int) -> None:
    """Wait until the executor holds ``count`` calls of the trajectory (running or queued)."""

    def probe() -> bool:
        info = trajectory_info(server, trajectory)
        return info is not None and info["in_flight"] >= count

    wait_for(probe, 15, f"{count} calls of {trajectory!r} in the executor")


class Background:
    """Run a function in a thread; ``result()`` joins it and re-raises what it raised."""

    def __init__(self, function: Callable[[], T]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

        def run() -> None:
            try:
                self.value = function()
            except BaseException as exc:
                self.error = exc
            finally:
                self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout_s: float = 120) -> Any:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def sandbox_ids(server: ExecutorServer) -> list[str]:
    """Ids of the pool's live sandboxes, lowest index first."""
    return [s["sandbox_id"] for s in server.status()["pool"]["per_sandbox"]]


def pid_alive(pid: int) -> bool:
    """True for a running process (a zombie, already dead, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def background_sh(
    server: ExecutorServer, trajectory: str, command: str, timeout_s: float | None = None
) -> Background:
    """Run a terminal command of a trajectory in a thread, on a client of its own."""

    def run() -> dict[str, Any]:
        with new_client(server) as client:
            return execute(client, trajectory, command, timeout_s)

    return Background(run)
