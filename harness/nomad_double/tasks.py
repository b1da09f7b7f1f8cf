"""The task runner: what a Nomad client does for one ``raw_exec`` task.

It starts ``Config.command`` with ``Config.args`` as a real process in its own process group
(https://developer.hashicorp.com/nomad/docs/drivers/raw_exec), with Nomad's runtime
environment (https://developer.hashicorp.com/nomad/docs/runtime/environment), renders
templates first, captures logs to ``alloc/logs/<task>.std{out,err}.0``, restarts it per the
group's restart policy (https://developer.hashicorp.com/nomad/docs/job-specification/restart,
the logic of client/allocrunner/taskrunner/restarts) and kills it with the task's
``KillSignal`` (SIGINT by default) then SIGKILL after ``KillTimeout``
(https://developer.hashicorp.com/nomad/docs/job-declare/exit-signals).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import events
from .common import NS_PER_S, Json, as_int, get_dict, get_list, go_duration, now_ns
from .state import TaskState
from .templates import Lookup, TemplateError, parse_env_file, render

POLL_S = 0.05
_INTERPOLATE = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


@dataclass
class TaskDirs:
    """Nomad's allocation directory layout for one task."""

    alloc_dir: Path
    task_dir: Path

    @property
    def local_dir(self) -> Path:
        return self.task_dir / "local"

    @property
    def secrets_dir(self) -> Path:
        return self.task_dir / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.alloc_dir / "logs"

    def create(self) -> None:
        for path in (
            self.alloc_dir / "data",
            self.alloc_dir / "tmp",
            self.logs_dir,
            self.local_dir,
            self.secrets_dir,
            self.task_dir / "tmp",
            self.task_dir / "private",
        ):
            path.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.chmod(0o700)


@dataclass
class Outcome:
    """How one run of the process ended."""

    stopped: bool = False
    start_error: str = ""
    unrecoverable: bool = False
    exit_code: int = 0
    signal: int = 0


class RestartTracker:
    """client/allocrunner/taskrunner/restarts.RestartTracker, without jitter."""

    def __init__(self, policy: Json, job_type: str) -> None:
        self.attempts = as_int(policy.get("Attempts"))
        self.interval_ns = as_int(policy.get("Interval"))
        self.delay_ns = as_int(policy.get("Delay"))
        self.mode = str(policy.get("Mode") or "fail")
        self.on_success = job_type != "batch"
        self.count = 0
        self.start_ns = now_ns()

    def decide(self, outcome: Outcome) -> tuple[str, int, str]:
        """Returns (state, delay_ns, reason); state is restart, fail or done."""
        successful = not outcome.start_error and outcome.exit_code == 0 and not outcome.signal
        if self.attempts == 0:
            if not self.on_success and successful:
                return "done", 0, ""
            return "fail", 0, "Policy allows no restarts"
        now = now_ns()
        end = self.start_ns + self.interval_ns
        if now > end:
            self.count = 0
            self.start_ns = now
        self.count += 1
        if outcome.start_error and outcome.unrecoverable:
            return "fail", 0, "Error was unrecoverable"
        if successful and not self.on_success:
            return "done", 0, "Restart unnecessary as task terminated successfully"
        if self.count > self.attempts:
            if self.mode == "fail":
                interval = go_duration(self.interval_ns)
                reason = f"Exceeded allowed attempts {self.attempts} in interval {interval}"
                return "fail", 0, reason + ' and mode is "fail"'
            return "restart", max(0, end - now), events.REASON_DELAY
        return "restart", self.delay_ns, events.REASON_WITHIN_POLICY


class TaskHooks:
    """What a task runner needs from its node (the double's client)."""

    def update(
        self, alloc_id: str, task: str, change: Callable[[TaskState], None], event: Json | None
    ) -> None:
        raise NotImplementedError

    def lookup_variable(self, job: Json, group: str, task: str) -> Lookup:
        raise NotImplementedError

    def driver_usable(self, driver: str) -> str:
        """Empty when this node can run ``driver``, otherwise the driver error."""
        raise NotImplementedError


class TaskRunner:
    def __init__(
        self,
        *,
        hooks: TaskHooks,
        alloc_id: str,
        job: Json,
        group: Json,
        task: Json,
        dirs: TaskDirs,
        env: dict[str, str],
    ) -> None:
        self.hooks = hooks
        self.alloc_id = alloc_id
        self.job = job
        self.group = group
        self.task = task
        self.name = str(task.get("Name"))
        self.dirs = dirs
        self.base_env = env
        self.used_vars: set[tuple[str, str]] = set()
        self._rendered: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_lock = threading.Lock()
        self._stop = threading.Event()
        self._kill_now = threading.Event()
        self._restart = threading.Event()
        self._wake = threading.Event()
        self.stop_reason = ""
        self._stop_event: Json | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"nomad-double-task-{alloc_id[:8]}-{self.name}", daemon=True
        )

    # -- control, from any thread ------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, reason: str = "", event: Json | None = None) -> None:
        """Graceful stop: KillSignal, then SIGKILL after KillTimeout.

        ``event`` (such as "Sibling Task Failed") is recorded when the kill starts.
        """
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop_event = event
            self._stop.set()
        self._wake.set()

    def kill_now(self) -> None:
        """Stop with SIGKILL straight away (the double is closing)."""
        self._kill_now.set()
        self.stop("the Nomad test double is closing")

    def crash(self) -> bool:
        """SIGKILL the running process without telling the runner (a crash)."""
        with self._proc_lock:
            proc = self._proc
            if proc is None or _exited(proc):
                return False
            _signal_group(proc, signal.SIGKILL)
            return True

    def signal(self, sig: int) -> None:
        with self._proc_lock:
            proc = self._proc
            if proc is not None and not _exited(proc):
                _signal_group(proc, sig)

    def request_restart(self) -> None:
        self._restart.set()
        self._wake.set()

    @property
    def pid(self) -> int | None:
        with self._proc_lock:
            proc = self._proc
            return proc.pid if proc is not None and not _exited(proc) else None

    # -- the runner thread -------------------------------------------------------------------

    def _emit(self, event: Json | None, change: Callable[[TaskState], None] | None = None) -> None:
        self.hooks.update(self.alloc_id, self.name, change or (lambda _ts: None), event)

    def _run(self) -> None:
        self._emit(events.task_setup())
        restart_policy = get_dict(self.group, "RestartPolicy")
        tracker = RestartTracker(restart_policy, str(self.job.get("Type") or "service"))
        while True:
            if self._stop.is_set():
                self._finish(failed=False, killed_before_start=True)
                return
            self._restart.clear()  # this start renders the templates afresh
            outcome = self._run_once()
            if outcome.stopped:
                self._finish(failed=False)
                return
            if self._restart.is_set():
                self._restart.clear()
                self._emit(events.restarting(0, "User requested restart"), _restarted)
                continue
            state, delay_ns, reason = tracker.decide(outcome)
            if state == "done":
                self._finish(failed=False)
                return
            if state == "fail":
                self._emit(events.not_restarting(reason))
                self._finish(failed=True)
                return
            self._emit(events.restarting(delay_ns, reason), _restarted)
            if self._stop.wait(delay_ns / NS_PER_S):
                self._finish(failed=False, killed_before_start=True)
                return

    def _finish(self, *, failed: bool, killed_before_start: bool = False) -> None:
        if killed_before_start and self._stop_event is not None:
            self._emit(self._stop_event)
            self._stop_event = None

        def change(ts: TaskState) -> None:
            ts.state = "dead"
            ts.failed = failed
            ts.finished_at = now_ns()

        self._emit(events.killed() if killed_before_start else None, change)

    def _run_once(self) -> Outcome:
        driver = str(self.task.get("Driver") or "")
        problem = self.hooks.driver_usable(driver)
        if problem:
            return self._start_failed(problem, unrecoverable=True)
        try:
            env = self._prepare()
        except TemplateError as err:
            message = f"Template failed: {err}"
            self._emit(events.template(message))
            return Outcome(start_error=message, unrecoverable=True)
        config = get_dict(self.task, "Config")
        command = _interpolate(str(config.get("command") or ""), env)
        args = [_interpolate(str(arg), env) for arg in get_list(config, "args")]
        executable = self._resolve(command, env)
        if executable is None:
            error = (
                "failed to launch command with executor: rpc error: code = Unknown desc = "
                f"file {command} not found under path {self.dirs.task_dir}"
            )
            return self._start_failed(error, unrecoverable=True)
        logs = self.dirs.logs_dir
        try:
            with (
                open(logs / f"{self.name}.stdout.0", "ab") as out,
                open(logs / f"{self.name}.stderr.0", "ab") as err_file,
            ):
                proc = subprocess.Popen(
                    [executable, *args],
                    cwd=self.dirs.task_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err_file,
                    start_new_session=True,
                )
        except OSError as err:
            return self._start_failed(f"failed to launch command with executor: {err}", True)
        with self._proc_lock:
            self._proc = proc

        def running(ts: TaskState) -> None:
            ts.state = "running"
            ts.started_at = now_ns()

        self._emit(events.started(), running)
        return self._wait(proc)

    def _start_failed(self, error: str, unrecoverable: bool) -> Outcome:
        self._emit(events.driver_failure(error))
        return Outcome(start_error=error, unrecoverable=unrecoverable)

    def _wait(self, proc: subprocess.Popen[bytes]) -> Outcome:
        while True:
            if _exited(proc):
                code = self._reap(proc)
                sig = -code if code < 0 else 0
                exit_code = 128 + sig if sig else code
                self._emit(events.terminated(exit_code, sig))
                return Outcome(exit_code=exit_code, signal=sig)
            if self._stop.is_set():
                self._kill(proc, self.stop_reason)
                return Outcome(stopped=True)
            if self._restart.is_set():
                self._emit(events.restart_signaled("Template with change_mode restart re-rendered"))
                self._kill(proc, "")
                return Outcome(exit_code=0)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _kill(self, proc: subprocess.Popen[bytes], reason: str) -> None:
        timeout_ns = as_int(self.task.get("KillTimeout"), 5 * NS_PER_S)
        if self._stop_event is not None:
            self._emit(self._stop_event)
            self._stop_event = None
        if not self._kill_now.is_set():
            self._emit(events.killing(timeout_ns, reason))
            with self._proc_lock:
                _signal_group(proc, _kill_signal(str(self.task.get("KillSignal") or "")))
            deadline = time.monotonic() + timeout_ns / NS_PER_S
            while not _exited(proc) and time.monotonic() < deadline:
                if self._kill_now.is_set():
                    break
                time.sleep(POLL_S / 2)
        self._reap(proc)
        if self._stop.is_set():
            self._emit(events.killed())

    def _reap(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGKILL what is left of the process group, then reap the leader.

        The leader is reaped last: until then its pid, and so the group id, cannot be reused.
        """
        with self._proc_lock:
            _signal_group(proc, signal.SIGKILL)
            code = proc.wait()
            self._proc = None
        return code

    # -- environment and templates -----------------------------------------------------------

    def _prepare(self) -> dict[str, str]:
        """Render templates (writing their files) and build the process environment."""
        env = dict(self.base_env)
        task_env = self.task.get("Env")
        if isinstance(task_env, dict):
            for key, value in task_env.items():
                env[str(key)] = _interpolate(str(value), env)
        template_env: dict[str, str] = {}
        lookup = self.hooks.lookup_variable(self.job, str(self.group.get("Name")), self.name)
        namespace = str(self.job.get("Namespace") or "default")
        for template in get_list(self.task, "Templates"):
            if not isinstance(template, dict):
                continue
            rendered = render(str(template.get("EmbeddedTmpl") or ""), namespace, lookup, env)
            self.used_vars |= rendered.paths
            dest = self._destination(str(template.get("DestPath") or ""), env)
            if self._rendered.get(str(dest)) is None:
                region = env.get("NOMAD_REGION", "global")
                for path in rendered.missing:
                    self._emit(events.template(f"Missing: nomadVar.block({path}.{region})"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rendered.text)
            perms = str(template.get("Perms") or "0644")
            dest.chmod(int(perms, 8))
            self._rendered[str(dest)] = rendered.text
            if template.get("Envvars"):
                template_env.update(parse_env_file(rendered.text))
        env.update(template_env)
        return env

    def rerender(self) -> bool:
        """Render again after a variable change; True when any template changed."""
        changed = False
        env = dict(self.base_env)
        lookup = self.hooks.lookup_variable(self.job, str(self.group.get("Name")), self.name)
        namespace = str(self.job.get("Namespace") or "default")
        for template in get_list(self.task, "Templates"):
            if not isinstance(template, dict):
                continue
            try:
                rendered = render(str(template.get("EmbeddedTmpl") or ""), namespace, lookup, env)
            except TemplateError:
                continue
            dest = self._destination(str(template.get("DestPath") or ""), env)
            if self._rendered.get(str(dest)) != rendered.text:
                changed = True
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(rendered.text)
                self._rendered[str(dest)] = rendered.text
                mode = str(template.get("ChangeMode") or "restart")
                if mode == "signal":
                    self.signal(_kill_signal(str(template.get("ChangeSignal") or "SIGHUP")))
                elif mode == "restart":
                    self.request_restart()
        return changed

    def _destination(self, dest: str, env: Mapping[str, str]) -> Path:
        dest = _interpolate(dest, env)
        path = Path(dest)
        return path if path.is_absolute() else self.dirs.task_dir / path

    def _resolve(self, command: str, env: Mapping[str, str]) -> str | None:
        if not command:
            return None
        if os.path.isabs(command):
            return command if os.path.exists(command) else None
        for base in (self.dirs.task_dir, self.dirs.local_dir):
            candidate = base / command
            if candidate.is_file():
                return str(candidate)
        return shutil.which(command, path=env.get("PATH", os.defpath))


def _restarted(ts: TaskState) -> None:
    ts.state = "pending"
    ts.restarts += 1
    ts.last_restart = now_ns()


def _interpolate(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key.startswith("env."):
            key = key[4:]
        return env.get(key, match.group(0))

    return _INTERPOLATE.sub(replace, text)


def _kill_signal(name: str) -> int:
    if not name:
        return int(signal.SIGINT)
    value = getattr(signal, name.upper(), None)
    return int(value) if isinstance(value, int) else int(signal.SIGINT)


def _exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether the process has exited, without reaping it (its pid stays reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
