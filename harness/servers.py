"""Real servers on loopback for tests and benchmarks: sandbox servers and executor services.

Each server runs in a directory of its own (its data, its log; other uids may traverse it,
since slots run as uids of their own), on a free port, with none of this shell's settings for
it. ``stop()`` ends the process and removes the directory; the log stays readable.

    server = start_sandbox(slots=2)          # returns once GET /health answers 200
    server.sh("slot_0", "echo hi")["output"]  # "hi"
    server.stop()

    executor = start_executor(env={"TOOL_EXECUTOR_SLOTS": "2"}, backend="nomad")
    executor.sh("trajectory-1", "echo hi")    # its pool runs on a Nomad double of its own
    executor.stop()                           # the double is closed with it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.nomad_double import NomadDouble

# The bearer token servers started here expect, unless told otherwise.
TOKEN = "test-token-0123456789"
# The ACL token of Nomad doubles started here.
NOMAD_ACL_TOKEN = "nomad-acl-token-for-tests"
# The backend executors run on unless told: the executor suites run on the local backend, and
# again with TEST_BACKEND=nomad on the Nomad API double, which runs sandboxes as raw_exec does.
DEFAULT_BACKEND = os.environ.get("TEST_BACKEND", "local")
# Settings under an executor's own ``env``: a small pool (1..2 sandboxes of 4 slots) whose
# health is checked often. Benchmarks size their pools themselves and pass ``defaults={}``.
SMALL_POOL: Mapping[str, str] = {
    "TOOL_EXECUTOR_SLOTS": "4",
    "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
    "TOOL_EXECUTOR_MAX_CONTAINERS": "2",
    "TOOL_EXECUTOR_HEALTH_INTERVAL_S": "0.5",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def traversable_dir() -> Path:
    """A new temporary directory other uids may traverse (``mkdtemp`` makes it 0700, and
    slots run as uids of their own below it). Whoever makes one removes it."""
    path = Path(tempfile.mkdtemp(prefix="atropos-harness-"))
    path.chmod(0o711)
    return path


@contextlib.contextmanager
def temporary_dir() -> Iterator[Path]:
    """A ``traversable_dir`` removed with everything in it when the block ends."""
    path = traversable_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class ServerProcess:
    """A server this run started, the directory it lives in, its log, and a client that
    authenticates like its callers."""

    process: subprocess.Popen[str]
    port: int
    directory: Path
    token: str | None
    client: httpx.Client = field(init=False)
    # The log as it was when ``stop`` removed the directory.
    last_log: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        if self.last_log is not None:
            return self.last_log
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> None:
        """End the process (SIGTERM, then SIGKILL after ``timeout_s``), remove its directory."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.last_log is None:
            self.last_log = self.log()
            shutil.rmtree(self.directory, ignore_errors=True)


class SandboxServer(ServerProcess):
    """A running ``python -m atropos_agent.sandbox``; ``data_dir`` holds its slots."""

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

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


@dataclass
class ExecutorServer(ServerProcess):
    """A running ``atropos-tool-executor serve``; ``nomad`` is the double its pool runs on
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

    def stop(self, timeout_s: float = 30) -> None:
        super().stop(timeout_s)
        if self.nomad is not None:
            self.nomad.close()


def start_sandbox(
    *,
    slots: int = 4,
    token: str | None = TOKEN,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout_s: float = 60,
) -> SandboxServer:
    """Start ``python -m atropos_agent.sandbox`` with ``slots`` slots and command-line ``args``.

    Its environment is this process's without ``ATROPOS_SANDBOX_*``, then ``env``. With
    ``wait``, returns once it is healthy (see ``wait_until_healthy``).
    """
    directory = traversable_dir()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ATROPOS_SANDBOX_")}
    full_env.update(env or {})
    if token:
        full_env["ATROPOS_SANDBOX_TOKEN"] = token
    port = free_port()
    argv = [
        *(sys.executable, "-m", "atropos_agent.sandbox", "--port", str(port)),
        *("--slots", str(slots), "--data-dir", str(directory / "data"), *args),
    ]
    process = spawn(argv, full_env, directory)
    server = SandboxServer(process, port, directory, token)
    if wait:
        wait_until_healthy(server, timeout_s)
    return server


def start_executor(
    *,
    env: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] = SMALL_POOL,
    token: str | None = TOKEN,
    backend: str = DEFAULT_BACKEND,
    nomad: NomadDouble | None = None,
    args: Sequence[str] = (),
    wait: bool = True,
    timeout_s: float = 90,
    port: int | None = None,
    state_dir: Path | None = None,
    pool_in_state_dir: bool = False,
    app_path: str | None = None,
) -> ExecutorServer:
    """Start ``atropos-tool-executor serve``; ``env`` holds its ``TOOL_EXECUTOR_*`` settings,
    over ``defaults``, and none of this shell's.

    With ``backend="nomad"`` its pool runs on ``nomad`` (a double the caller owns), or on a
    double of its own that stops with it. With ``wait``, returns once it is healthy.

    It listens on ``port`` (default: a free one). Its state directory (lease journal, pool
    dirs) is ``state_dir``, which the caller owns (an executor started again on the same port
    and state dir is the same service to trainers), else one in its own directory. Its pool's
    data dir is in its own directory too, unless ``pool_in_state_dir`` leaves it to the
    executor, as in production (``pool-*`` under the state dir).

    With ``app_path`` (``module:app``) it runs as plain ``uvicorn app_path`` instead, with
    uvicorn's own defaults, as deployments that serve the app that way do.
    """
    directory = traversable_dir()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
    full_env.update(defaults)
    if not pool_in_state_dir:
        full_env["TOOL_EXECUTOR_SANDBOX_DATA_DIR"] = str(directory / "pool")
    full_env["TOOL_EXECUTOR_STATE_DIR"] = str(state_dir or directory / "state")
    if token:
        full_env["TOOL_EXECUTOR_TOKEN"] = token
    owned = None
    if backend == "nomad":
        if nomad is None:
            nomad = owned = start_nomad_double()
        full_env.update(nomad_settings(nomad))
    full_env.update(env or {})
    port = port or free_port()
    argv = [sys.executable, "-m", "atropos_agent.cli", "serve", "--port", str(port), *args]
    if app_path is not None:
        argv = [sys.executable, "-m", "uvicorn", app_path, "--port", str(port), *args]
    process = spawn(argv, full_env, directory)
    server = ExecutorServer(process, port, directory, token, nomad=owned)
    if wait:
        wait_until_healthy(server, timeout_s)
    return server


def spawn(argv: Sequence[str], env: Mapping[str, str], directory: Path) -> subprocess.Popen[str]:
    """Start ``argv`` in ``directory``, its output to ``directory/server.log``."""
    with open(directory / "server.log", "w") as log_file:
        return subprocess.Popen(
            argv, env=env, cwd=directory, stdout=log_file, stderr=subprocess.STDOUT, text=True
        )


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


def start_nomad_double(acl_token: str | None = NOMAD_ACL_TOKEN) -> NomadDouble:
    """A started Nomad double; ``close()`` kills its processes and removes its directory."""
    return NomadDouble(acl_token=acl_token).start()


def nomad_settings(double: NomadDouble) -> dict[str, str]:
    """Executor settings that put its pool on the double, as raw_exec tasks of this Python."""
    settings = {
        "TOOL_EXECUTOR_BACKEND": "nomad",
        "TOOL_EXECUTOR_NOMAD_ADDRESS": double.address,
        "TOOL_EXECUTOR_NOMAD_DRIVER": "raw_exec",
        "TOOL_EXECUTOR_NOMAD_RAW_EXEC_COMMAND": sys.executable,
        "TOOL_EXECUTOR_NOMAD_CPU_MHZ": "500",
        "TOOL_EXECUTOR_NOMAD_MEMORY_MB": "512",
        "TOOL_EXECUTOR_NOMAD_RESTART_DELAY_S": "1",
    }
    if double.acl_token:
        settings["NOMAD_TOKEN"] = double.acl_token
    return settings
