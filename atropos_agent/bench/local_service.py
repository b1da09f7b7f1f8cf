"""An executor service started for one bench run, and the baseline's sandbox servers beside it.

The executor runs as ``python -m atropos_agent.cli serve`` on the local backend, on a free
loopback port, with a token of its own and every directory it writes (state, pool, logs) in a
temporary directory, its pool fixed at ``sandboxes`` of ``slots`` (no scaling during the run).
The baseline's sandbox servers are ``python -m atropos_agent.sandbox`` with the same slots and
the same defaults as the executor gives its own. ``stop()`` ends them all and removes the
directory; children are also told to end if this process dies first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HEALTH_POLL_S = 0.2
EXECUTOR_STOP_TIMEOUT_S = 90.0
SANDBOX_STOP_TIMEOUT_S = 30.0
# The executor stops its own sandboxes within this after SIGTERM (a pool of a thousand slots
# takes seconds; the service's default bound is for Nomad's kill timeout, not for this).
EXECUTOR_SHUTDOWN_TIMEOUT_S = 60.0
# The first host uid of the baseline's slots: above the executor's own (200,000 on), so that
# the two pools do not race for the same ranges (each server claims its range either way).
BASELINE_UID_BASE = 400_000
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies
    (Linux ``prctl``); None where there is no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_death_signal


@dataclass
class Child:
    """A server process this run started, where it listens and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class LocalService:
    """The executor (and baseline sandboxes) of one run; ``start`` returns once all answer
    ``/health``; ``stop`` is safe to call at any point after construction."""

    sandboxes: int
    slots: int
    baseline: bool
    start_timeout_s: float
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    sandbox_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    directory: Path | None = None
    executor: Child | None = None
    baseline_servers: list[Child] = field(default_factory=list)
    # Seconds from the executor's start to its health, then for the baseline's servers.
    start_s: float | None = None
    baseline_start_s: float | None = None

    @property
    def url(self) -> str:
        assert self.executor is not None
        return self.executor.url

    @property
    def baseline_urls(self) -> list[str]:
        return [server.url for server in self.baseline_servers]

    def start(self) -> None:
        """The executor, then the baseline's servers one by one: a sandbox starts all its slots
        at once, and a small machine starting thousands together would time some out."""
        started = time.monotonic()
        deadline = started + self.start_timeout_s
        # Slots run as uids of their own below this directory: they must traverse it.
        self.directory = Path(tempfile.mkdtemp(prefix="atropos-bench-"))
        self.directory.chmod(0o711)
        self.executor = self._spawn("executor", self._executor_argv(), self._executor_env())
        wait_until_healthy(self.executor, deadline)
        self.start_s = time.monotonic() - started
        if self.baseline:
            for index in range(self.sandboxes):
                argv, env = self._sandbox_argv(index), self._sandbox_env(index)
                self.baseline_servers.append(self._spawn(f"sandbox-{index}", argv, env))
                wait_until_healthy(self.baseline_servers[-1], deadline)
        self.baseline_start_s = time.monotonic() - started - self.start_s

    def stop(self) -> None:
        for server in self.baseline_servers:
            with contextlib.suppress(ProcessLookupError):
                server.process.terminate()
        if self.executor is not None:
            self.executor.stop(EXECUTOR_STOP_TIMEOUT_S)
        for server in self.baseline_servers:
            server.stop(SANDBOX_STOP_TIMEOUT_S)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    # ---- processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        assert self.directory is not None
        port = argv[argv.index("--port") + 1]
        log_path = self.directory / f"{name}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                argv,
                env=env,
                # Away from the caller's .env files: the run's settings are all given here.
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Safe: the bench starts its servers before any thread of its own.
                preexec_fn=die_with_parent(),
            )
        return Child(name, process, f"http://127.0.0.1:{port}", log_path)

    def _executor_argv(self) -> list[str]:
        return [
            *(sys.executable, "-m", "atropos_agent.cli", "serve"),
            *("--host", "127.0.0.1", "--port", str(free_port()), "--backend", "local"),
            *("--log-level", "warning"),
        ]

    def _executor_env(self) -> dict[str, str]:
        assert self.directory is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
        env.update(
            {
                "TOOL_EXECUTOR_TOKEN": self.token,
                "TOOL_EXECUTOR_SLOTS": str(self.slots),
                "TOOL_EXECUTOR_MIN_CONTAINERS": str(self.sandboxes),
                "TOOL_EXECUTOR_MAX_CONTAINERS": str(self.sandboxes),
                "TOOL_EXECUTOR_STATE_DIR": str(self.directory / "state"),
                "TOOL_EXECUTOR_SANDBOX_DATA_DIR": str(self.directory / "pool"),
                # Hundreds of slots per sandbox start slowly on a small machine.
                "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S": f"{self.start_timeout_s:g}",
                "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
                "TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S": f"{EXECUTOR_SHUTDOWN_TIMEOUT_S:g}",
            }
        )
        return env

    def _sandbox_argv(self, index: int) -> list[str]:
        assert self.directory is not None
        return [
            *(sys.executable, "-m", "atropos_agent.sandbox"),
            *("--host", "127.0.0.1", "--port", str(free_port()), "--slots", str(self.slots)),
            *("--data-dir", str(self.directory / f"baseline-{index}")),
            *("--parent-pid", str(os.getpid()), "--log-level", "warning"),
        ]

    def _sandbox_env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATROPOS_SANDBOX_")}
        env["ATROPOS_SANDBOX_TOKEN"] = self.sandbox_token
        env["ATROPOS_SANDBOX_SLOT_UID_BASE"] = str(BASELINE_UID_BASE + index * self.slots)
        return env


def wait_until_healthy(child: Child, deadline: float) -> None:
    """Until ``GET /health`` answers 200; ``RuntimeError`` with the child's log otherwise."""
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(
                f"the bench's {child.name} exited with status {child.process.returncode} "
                f"while starting:\n{child.log_tail()}"
            )
        try:
            with urllib.request.urlopen(child.url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(HEALTH_POLL_S)
    raise RuntimeError(
        f"the bench's {child.name} was not healthy within the start timeout; raise "
        f"--start-timeout or use fewer slots. Its log ends:\n{child.log_tail()}"
    )
