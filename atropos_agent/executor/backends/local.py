"""The embedded default: sandbox servers as child processes of the executor, on this machine.

Each sandbox is ``python -m atropos_agent.sandbox`` on a loopback port with a per-pool random
token. A child that dies is started again in its place under a new ``sandbox_id`` (so the pool
knows its workspaces are gone), with a back-off; one that keeps dying is reported, not retried
forever. Children get SIGTERM when the executor dies (``--parent-pid``), so none outlives it.
Their data dir is claimed by a lock that the children hold too (``pool_dir.py``), so the next
executor removes what a killed one left, and never what a live one uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atropos_agent.errors import BackendError, SandboxUnavailable
from atropos_agent.executor.backends.base import Backend, SandboxInfo
from atropos_agent.executor.backends.pool_dir import PoolDir, claim_pool_dir
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.settings import LocalSettings
from atropos_agent.executor.transport import Transport

log = logging.getLogger("atropos.backend.local")

STOP_TIMEOUT_S = 10.0
# A child that dies this many times within RESTART_WINDOW_S is left down and reported.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Child:
    index: int
    generation: int
    port: int
    process: asyncio.subprocess.Process
    log_path: Path
    ready: bool = False
    stopping: bool = False
    restarts: list[float] = field(default_factory=list)

    @property
    def sandbox_id(self) -> str:
        return f"local-{self.index}-{self.generation}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        """Its log's last lines, or why there are none: never an empty reason."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"its log {self.log_path.name} cannot be read ({exc.strerror or exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        if not tail.strip():
            return f"its log {self.log_path.name} is empty"
        return f"its log {self.log_path.name} ends:\n{tail}"

    def exit_reason(self) -> str | None:
        status = self.process.returncode
        if status is None:
            return None
        if status < 0:
            try:
                return f"it was killed by {signal.Signals(-status).name}"
            except ValueError:
                return f"it was killed by signal {-status}"
        return f"it exited with status {status}"


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: LocalSettings, transport: Transport) -> None:
        self.settings = settings
        self.transport = transport
        self.token = secrets.token_urlsafe(32)
        # Claimed at start; until then the configured one (or the state dir it goes under).
        self.pool_dir: PoolDir | None = None
        self.data_dir = Path(settings.data_dir or settings.state_dir).resolve()
        self.children: dict[int, Child] = {}
        self.failed: dict[int, str] = {}
        self.watchers: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.generation = 0

    # ---- life cycle

    async def start(self, count: int) -> None:
        # Removing a dead predecessor's workspaces may take a while: off the event loop.
        self.pool_dir = await asyncio.to_thread(
            claim_pool_dir, self.settings.state_dir, self.settings.data_dir
        )
        self.data_dir = self.pool_dir.path
        self.data_dir.chmod(0o711)
        results = await asyncio.gather(
            *(self._start_child(index) for index in range(count)), return_exceptions=True
        )
        errors = [
            str(result) or type(result).__name__
            for result in results
            if isinstance(result, BaseException)
        ]
        if errors:
            await self.stop()
            raise BackendError("local sandboxes failed to start: " + " | ".join(errors))

    async def stop(self) -> None:
        self.stopping = True
        for task in self.watchers:
            task.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
        await asyncio.gather(*(self._stop_child(child) for child in list(self.children.values())))
        self.children.clear()
        if self.pool_dir is not None:
            await asyncio.to_thread(self.pool_dir.release)
            self.pool_dir = None

    async def sandboxes(self) -> list[SandboxInfo]:
        return [
            SandboxInfo(sandbox_id=child.sandbox_id, url=child.url, index=child.index)
            for child in sorted(self.children.values(), key=lambda c: c.index)
            if child.ready and not child.stopping
        ]

    async def scale(self, count: int, idle: Collection[str]) -> None:
        count = max(self.settings.min_sandboxes, min(count, self.settings.max_sandboxes))
        running = sorted(self.children.values(), key=lambda c: c.index)
        if count > len(running):
            free = [i for i in range(self.settings.max_sandboxes) if i not in self.children]
            wanted = free[: count - len(running)]
            log.info("event=scale_up from=%d to=%d", len(running), len(running) + len(wanted))
            results = await asyncio.gather(
                *(self._start_child(index) for index in wanted), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.error("event=scale_up_failed error=%s", str(result) or repr(result))
        elif count < len(running):
            removable = [c for c in reversed(running) if c.sandbox_id in idle]
            doomed = removable[: len(running) - count]
            if doomed:
                log.info("event=scale_down from=%d to=%d", len(running), len(running) - len(doomed))
            await asyncio.gather(*(self._stop_child(child) for child in doomed))

    async def replace(self, sandbox_id: str) -> None:
        for child in list(self.children.values()):
            if child.sandbox_id == sandbox_id and child.process.returncode is None:
                log.warning("event=sandbox_replace sandbox=%s", sandbox_id)
                # The watcher sees the exit and starts a new one in its place.
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "data_dir": str(self.data_dir),
            "children": [
                {
                    "sandbox_id": c.sandbox_id,
                    "pid": c.process.pid,
                    "port": c.port,
                    "ready": c.ready,
                    "restarts": len(c.restarts),
                }
                for c in sorted(self.children.values(), key=lambda c: c.index)
            ],
            "failed": self.failed,
        }

    # ---- children

    def _argv(self, index: int, port: int) -> list[str]:
        # Settings travel in the environment (ATROPOS_SANDBOX_*), as on Nomad; flags only say
        # where this child listens and that it dies with us.
        return [
            sys.executable,
            "-m",
            "atropos_agent.sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir / f"sandbox-{index}"),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            "warning",
        ]

    def _env(self, index: int) -> dict[str, str]:
        # Only what the sandbox server needs: none of the executor's own secrets.
        env = {key: os.environ[key] for key in ("PATH", "LANG", "PYTHONPATH") if key in os.environ}
        env.update(self.settings.sandbox_env)
        uid_base = self.settings.slot_uid_base + index * self.settings.slots_per_sandbox
        env["ATROPOS_SANDBOX_SLOT_UID_BASE"] = str(uid_base)
        env["ATROPOS_SANDBOX_TOKEN"] = self.token
        return env

    async def _start_child(self, index: int, restarts: list[float] | None = None) -> Child:
        self.generation += 1
        port = free_port()
        log_path = self.data_dir / f"sandbox-{index}.log"
        with open(log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *self._argv(index, port),
                stdout=log_file,
                stderr=log_file,
                env=self._env(index),
                stdin=asyncio.subprocess.DEVNULL,
                # The child holds the pool dir's lock too, until it exits.
                pass_fds=(self.pool_dir.lock.fd,) if self.pool_dir else (),
            )
        child = Child(index, self.generation, port, process, log_path, restarts=restarts or [])
        self.children[index] = child
        try:
            await self._wait_ready(child)
        except BackendError:
            await self._stop_child(child)
            raise
        child.ready = True
        self.failed.pop(index, None)
        watcher = asyncio.create_task(self._watch(child), name=f"watch-{child.sandbox_id}")
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)
        log.info(
            "event=sandbox_started sandbox=%s pid=%d port=%d", child.sandbox_id, process.pid, port
        )
        return child

    async def _wait_ready(self, child: Child) -> None:
        async def exited() -> str | None:
            return child.exit_reason()

        try:
            await SandboxClient(child.url, self.transport).wait_until_healthy(
                self.settings.start_timeout_s, exited
            )
        except SandboxUnavailable as exc:
            # A sandbox still starting logs nothing (its log level is warning): say it runs.
            running = (
                f"; it is still running (pid {child.process.pid}): if it only starts slowly, "
                "raise TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S"
                if child.process.returncode is None
                else ""
            )
            raise BackendError(
                f"sandbox {child.index} did not start: {exc.message}{running}; {child.log_tail()}"
            ) from None

    async def _watch(self, child: Child) -> None:
        """Start a child again when it dies unexpectedly (with back-off, up to a limit)."""
        status = await child.process.wait()
        if child.stopping or self.stopping:
            return
        log.error("event=sandbox_died sandbox=%s status=%s", child.sandbox_id, status)
        child.ready = False
        now = time.monotonic()
        recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(recent) > MAX_RESTARTS:
            self.children.pop(child.index, None)
            self.failed[child.index] = (
                f"sandbox {child.index} died {len(recent)} times within {RESTART_WINDOW_S:.0f}s; "
                f"not restarted ({child.exit_reason()}); {child.log_tail()}"
            )
            log.error("event=sandbox_given_up index=%d", child.index)
            return
        await asyncio.sleep(min(0.2 * 2 ** (len(recent) - 1), 5.0))
        if self.stopping:
            return
        try:
            await self._start_child(child.index, restarts=recent)
        except BackendError as exc:
            self.children.pop(child.index, None)
            self.failed[child.index] = str(exc)
            log.error("event=sandbox_restart_failed index=%d error=%s", child.index, exc)

    async def _stop_child(self, child: Child) -> None:
        child.stopping = True
        child.ready = False
        if self.children.get(child.index) is child:
            del self.children[child.index]
        process = child.process
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
