"""Fixtures that start real sandbox servers (real bubblewrap, real slot agents) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from atropos_agent.executor.backends.local import free_port
from tests.nomad_double import NomadDouble

TOKEN = "test-token-0123456789"
NOMAD_ACL_TOKEN = "nomad-acl-token-for-tests"


@dataclass
class ServerProcess:
    """A server this test run started, its log, and an authenticated client for it."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    token: str | None
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class SandboxServer(ServerProcess):
    """A running ``python -m atropos_agent.sandbox``."""

    data_dir: Path = field(kw_only=True)

    def run(
        self, slot: str, tool: str, timeout: float | None = None, **args: Any
    ) -> dict[str, Any]:
        """Run one tool call through ``POST /execute`` and return the result."""
        item: dict[str, Any] = {"slot_id": slot, "tool": tool, "args": args}
        if timeout is not None:
            item["timeout"] = timeout
        response = self.client.post("/execute", json=item)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def sh(self, slot: str, command: str, timeout: float | None = None) -> dict[str, Any]:
        return self.run(slot, "terminal", timeout=timeout, command=command)


def start_sandbox(
    tmp: Path,
    *,
    slots: int = 4,
    token: str | None = TOKEN,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> SandboxServer:
    port = free_port()
    data_dir = tmp / "data"
    log_path = tmp / "server.log"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ATROPOS_SANDBOX_TOKEN", None)
    if token:
        full_env["ATROPOS_SANDBOX_TOKEN"] = token
    argv = [
        sys.executable,
        "-m",
        "atropos_agent.sandbox",
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--data-dir",
        str(data_dir),
        *(args or []),
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            argv, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, text=True
        )
    server = SandboxServer(process, port, log_path, token, data_dir=data_dir)
    if wait:
        wait_until_healthy(server)
    return server


def wait_until_healthy(server: ServerProcess, timeout_s: float = 60) -> None:
    """Until ``GET /health`` answers 200; stops the server and raises with its log otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.stop()
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"server not healthy after {timeout_s}s:\n{server.log()}")


def make_tmp() -> Path:
    # Slots run as other uids: the data dir's parents must be traversable (pytest's are 0700).
    path = Path(tempfile.mkdtemp(prefix="atropos-test-"))
    path.chmod(0o711)
    return path


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandbox servers with chosen settings; all are stopped after the test."""
    started: list[SandboxServer] = []

    def factory(**kwargs: Any) -> SandboxServer:
        server = start_sandbox(make_tmp(), **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    """One shared server with default settings for a test module."""
    server = start_sandbox(make_tmp(), slots=4)
    yield server
    server.stop()


def host_processes_matching(text: str) -> list[str]:
    """Command lines of host processes containing ``text`` (the test process excluded)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if text in cmdline:
            found.append(cmdline)
    return found


# The executor suites run against the local backend, and again with TEST_BACKEND=nomad
# against the Nomad API double (tests/nomad_double), which runs sandboxes the way raw_exec does.
TEST_BACKEND = os.environ.get("TEST_BACKEND", "local")
local_backend_only = pytest.mark.skipif(
    TEST_BACKEND != "local", reason="about the local backend's child processes"
)


@dataclass
class ExecutorServer(ServerProcess):
    """A running ``atropos-tool-executor serve``; ``nomad`` is the double its pool runs on,
    when the executor owns one (it is closed with the executor)."""

    nomad: NomadDouble | None = field(default=None, kw_only=True)

    def call(
        self, trajectory: str, name: str, timeout_s: float | None = None, **arguments: Any
    ) -> dict[str, Any]:
        """``POST /execute`` one tool call for a trajectory; returns the ToolResult."""
        body: dict[str, Any] = {
            "trajectory_id": trajectory,
            "tool": {"name": name, "arguments": arguments},
        }
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        response = self.client.post("/execute", json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def sh(self, trajectory: str, command: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self.call(trajectory, "terminal", timeout_s, command=command)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.client.get("/status").json()
        return status

    def stop(self) -> None:
        super().stop()
        if self.nomad is not None:
            self.nomad.close()


def nomad_settings(double: NomadDouble) -> dict[str, str]:
    """Executor settings that put its pool on the double, as raw_exec tasks of this Python."""
    return {
        "TOOL_EXECUTOR_BACKEND": "nomad",
        "TOOL_EXECUTOR_NOMAD_ADDRESS": double.address,
        "NOMAD_TOKEN": NOMAD_ACL_TOKEN,
        "TOOL_EXECUTOR_NOMAD_DRIVER": "raw_exec",
        "TOOL_EXECUTOR_NOMAD_RAW_EXEC_COMMAND": sys.executable,
        "TOOL_EXECUTOR_NOMAD_CPU_MHZ": "500",
        "TOOL_EXECUTOR_NOMAD_MEMORY_MB": "512",
        "TOOL_EXECUTOR_NOMAD_RESTART_DELAY_S": "1",
    }


def start_nomad_double() -> NomadDouble:
    root = make_tmp()  # traversable: slots run as other uids below the allocation dirs
    double = NomadDouble(acl_token=NOMAD_ACL_TOKEN, root=root)
    double.start()
    return double


def start_executor(
    tmp: Path,
    *,
    token: str | None = TOKEN,
    env: dict[str, str] | None = None,
    wait: bool = True,
    backend: str = TEST_BACKEND,
    nomad: NomadDouble | None = None,
) -> ExecutorServer:
    """Start the executor; ``env`` holds ``TOOL_EXECUTOR_*`` settings (small pools by default).

    With ``backend="nomad"`` its pool runs on ``nomad`` (a Nomad API double), or on a double
    of its own that stops with it.
    """
    port = free_port()
    log_path = tmp / "executor.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
    full_env.update(
        {
            "TOOL_EXECUTOR_SLOTS": "4",
            "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
            "TOOL_EXECUTOR_MAX_CONTAINERS": "2",
            "TOOL_EXECUTOR_SANDBOX_DATA_DIR": str(tmp / "pool"),
            "TOOL_EXECUTOR_HEALTH_INTERVAL_S": "0.5",
        }
    )
    if token:
        full_env["TOOL_EXECUTOR_TOKEN"] = token
    double = None
    if backend == "nomad":
        double = nomad or start_nomad_double()
        full_env.update(nomad_settings(double))
    full_env.update(env or {})
    argv = [sys.executable, "-m", "atropos_agent.cli", "serve", "--port", str(port)]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            argv, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=tmp
        )
    # A double passed in belongs to the caller; one started here goes with the executor.
    server = ExecutorServer(process, port, log_path, token, nomad=double if nomad is None else None)
    if wait:
        wait_until_healthy(server, timeout_s=90)
    return server


@pytest.fixture
def executor_factory() -> Iterator[Callable[..., ExecutorServer]]:
    """Start executors with chosen settings; all are stopped after the test."""
    started: list[ExecutorServer] = []

    def factory(**kwargs: Any) -> ExecutorServer:
        server = start_executor(make_tmp(), **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def executor() -> Iterator[ExecutorServer]:
    """One shared executor (1..2 sandboxes of 4 slots) for a test module."""
    server = start_executor(make_tmp())
    yield server
    server.stop()
