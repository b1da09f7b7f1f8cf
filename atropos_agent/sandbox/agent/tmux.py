"""The ``tmux`` tool: one interactive terminal per slot, for full-screen programs.

Imported on the first ``tmux`` call only (``tools.py``): an idle slot does not carry it.

The session is a tmux server started by the agent, so it runs inside the slot's isolation, as
the slot's uid, under its limits. Its socket is the default one under ``TMUX_TMPDIR`` set to
the slot's own scratch directory (``/tmp`` in the slot; a directory of its own per slot under
``--isolation none`` too), so a ``tmux`` typed in the slot's terminal reaches it and no other
slot can. The server daemonises and is re-parented to the agent (a child subreaper), which
reaps it when it dies; timeouts of other commands never kill it (they kill what *they*
started), while a reset, a release, a disk-limit stop and the agent's exit do.

The recording is an asciinema v2 cast: the agent writes the header line, ``tmux pipe-pane``
copies the pane's raw output into a FIFO (``cat``), and a thread of the agent reads the FIFO
and appends one ``[seconds, "o", text]`` line per read, timed as it arrives. No process beyond
``cat`` and no asciinema package is needed. The cast is capped at the slot's file size limit
(``max_file_bytes``); past it, one marker event says so and the rest is dropped.
"""

from __future__ import annotations

import os
import signal
import time

from .output import OutputCapture
from .processes import boottime_ticks
from .recording import Recorder, read_lines
from .results import CANCELLED, ToolError, failure
from .shell import shell_quote
from .tmux_keys import flag, integer, keys_argument, seconds, send_commands, with_wait_marker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .main import Agent

SESSION = "main"
DEFAULT_WIDTH = 200
DEFAULT_HEIGHT = 50
MIN_SIZE = 2
MAX_SIZE = 1000
# What full-screen programs in the pane are told they run in (and what a cast player emulates).
TERM = "xterm-256color"
HISTORY_LINES = 10000
ACTIONS = ("start", "send_keys", "capture", "stream", "stop")
# The longest one tmux client command (start, send-keys, capture) may take: they answer in ms.
CLIENT_TIMEOUT_S = 10.0
# Output kept from a client command before the capture's own cap applies.
CLIENT_OUTPUT_BYTES = 4 * 1024 * 1024


def answer(output: str, **metadata: Any) -> dict[str, Any]:
    return {
        "success": True,
        "output": output,
        "error": "",
        "metadata": {"stateful": True, **metadata},
    }


def find_program(name: str, path: str) -> str | None:
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class Tmux:
    """The slot's tmux session (at most one), its recording, and the stream's position."""

    def __init__(self, agent: Agent) -> None:
        config = agent.config
        self.config = config
        self.runner = agent.runner
        path = config.env.get("PATH", "/usr/bin:/bin")
        self.program = find_program("tmux", path)
        scratch = config.scratch[0] if config.scratch else config.env.get("TMPDIR", "/tmp")
        self.socket = os.path.join(scratch, f"tmux-{os.getuid()}", "default")
        self.dir = os.path.join(scratch, ".atropos-tmux")
        self.cast = os.path.join(self.dir, "session.cast")
        self.fifo = os.path.join(self.dir, "pane.fifo")
        self.rcfile = os.path.join(self.dir, "bashrc")
        self.env = {**config.env, "TERM": TERM, "TMUX_TMPDIR": scratch, "SHELL": config.shell}
        self.server_pid = -1
        self.width = self.height = 0
        # Set when the last session ended by itself (its shell exited, or it was killed).
        self.ended = False
        self.recorder: Recorder | None = None
        self.cursor = 0

    # ---- the tool

    def call(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        action = args.get("action")
        if action not in ACTIONS:
            action = "capture"  # as the old service did with an unknown action
        try:
            if action == "start":
                return self.start(args, deadline)
            if action == "send_keys":
                return self.send_keys(args, timeout, deadline)
            if action == "stream":
                return self.stream(args)
            if action == "stop":
                return self.stop()
            return self.capture(args, deadline)
        except ToolError as exc:
            return failure(str(exc), stateful=True, action=action)

    # ---- session life

    def running(self) -> bool:
        """Whether the session's server lives (reaping first: a dead one is forgotten then)."""
        self.runner.reap()
        return self.server_pid > 0

    def server_gone(self) -> None:
        """Called when the agent reaps the server: its shell exited, or the slot was stopped."""
        self.server_pid = -1
        self.ended = True

    def require_session(self) -> None:
        if not self.running():
            why = (
                " (the last one ended: its shell exited, or the slot's processes were stopped)"
                if self.ended
                else ""
            )
            raise ToolError(f"no tmux session is running{why}; start one with action 'start'")

    def start(self, args: dict[str, Any], deadline: float) -> dict[str, Any]:
        width = integer(args, "pane_width", DEFAULT_WIDTH, MIN_SIZE, MAX_SIZE)
        height = integer(args, "pane_height", DEFAULT_HEIGHT, MIN_SIZE, MAX_SIZE)
        if self.running() and self.client(["has-session", "-t", SESSION], deadline)[0] == 0:
            # A second start keeps the session (and what runs in it); stop first for a new one.
            return answer(
                "already running",
                already_running=True,
                pane_width=self.width,
                pane_height=self.height,
                session=SESSION,
                recording=self.cast,
            )
        if self.program is None:
            raise ToolError("tmux is not installed in this sandbox (apt-get install tmux)")
        # A server without the session (it was killed from inside) goes; a new one starts.
        self.kill_server()
        self.end_recording()
        shell = self.config.shell
        header = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(time.time()),
            "env": {"SHELL": shell, "TERM": TERM},
        }
        try:
            command = self.prepare_files(shell)
            self.recorder = Recorder(self.fifo, self.cast, self.config.max_file_bytes, header)
        except OSError as exc:
            raise ToolError(f"could not prepare the tmux session in {self.dir}: {exc}") from None
        self.cursor = 0
        options = {
            "default-terminal": TERM,
            "status": "off",
            "history-limit": str(HISTORY_LINES),
            "default-shell": shell,
            "default-command": command,
        }
        argv = ["-f", os.devnull, "start-server"]
        for name, value in options.items():
            argv += [";", "set-option", "-g", name, value]
        argv += [
            *(";", "new-session", "-d", "-s", SESSION, "-c", self.config.root),
            *("-x", str(width), "-y", str(height)),
            *(";", "pipe-pane", "-o", "-t", SESSION, f"exec cat > {shell_quote(self.fifo)}"),
            *(";", "display-message", "-p", "-t", SESSION),
            "#{pid} #{pane_width} #{pane_height}",
        ]
        try:
            code, out = self.client(argv, deadline)
        except ToolError:
            self.end_recording()
            raise
        fields = out.split()
        if code != 0 or len(fields) < 3 or not all(field.isdigit() for field in fields[-3:]):
            try:  # a server may have started before a later command failed
                self.client(["kill-server"], deadline)
            except ToolError:
                pass
            self.kill_server()
            self.end_recording()
            raise ToolError(f"tmux could not start a session: {out.strip() or f'exit {code}'}")
        pid, self.width, self.height = (int(field) for field in fields[-3:])
        self.server_pid = pid
        self.ended = False
        # The agent reaps the server when it dies (it is re-parented to the agent), and learns so.
        self.runner.watched[pid] = self.server_gone
        return answer(
            "started",
            pane_width=self.width,
            pane_height=self.height,
            session=SESSION,
            term=TERM,
            recording=self.cast,
            server_pid=pid,
        )

    def prepare_files(self, shell: str) -> str:
        """A fresh FIFO, no recording, no stale socket; returns the pane's command."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for path in (self.fifo, self.cast, self.socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.mkfifo(self.fifo, 0o600)
        if not shell.endswith("bash"):
            return f"exec {shell_quote(shell)}"
        with open(self.rcfile, "w") as handle:
            # The prompt shows the directory: /workspace$
            handle.write("PS1='$PWD\\$ '\n")
        return f"exec {shell_quote(shell)} --noprofile --rcfile {shell_quote(self.rcfile)}"

    def stop(self) -> dict[str, Any]:
        was_running = self.running()
        self.kill_server()
        self.end_recording()
        self.ended = False
        return answer("stopped", was_running=was_running, session=SESSION)

    def kill_server(self) -> None:
        """Kill the server and every process of the session, as a timeout would."""
        pid, self.server_pid = self.server_pid, -1
        if pid > 0:
            self.runner.watched.pop(pid, None)
            self.runner.kill_tree(pid, boottime_ticks())
        try:
            os.unlink(self.socket)
        except OSError:
            pass

    def end_recording(self) -> None:
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.stop()

    # ---- keys, screen, recording

    def send_keys(self, args: dict[str, Any], timeout: float, deadline: float) -> dict[str, Any]:
        keys = keys_argument(args)
        block = flag(args, "block")
        max_wait = min(seconds(args, "max_wait_s", timeout), timeout)
        min_wait = seconds(args, "min_wait_s", 0.0)
        self.require_session()
        channel = ""
        if block:
            channel = f"done-{os.urandom(4).hex()}"
            keys = with_wait_marker(keys, channel)
        for command in send_commands(keys, SESSION):
            code, out = self.client(command, deadline)
            if code != 0:
                raise ToolError(f"tmux send-keys failed: {self.explain(out, code)}")
        if not block:
            if min_wait:
                self.runner.pause(max(0.0, min(min_wait, deadline - time.monotonic())))
            return answer("ok", blocked=False)
        waited = time.monotonic()
        code, out = self.client(["wait-for", channel], min(deadline, waited + max_wait), wait=True)
        if code is None:
            return failure(
                f"the keys were sent, but the command had not finished after {max_wait:g}s; it "
                "is still running in the tmux session (capture shows it, C-c interrupts it)",
                stateful=True,
                blocked=True,
                timed_out=True,
            )
        if code != 0:
            raise ToolError(f"waiting for the command failed: {self.explain(out, code)}")
        return answer("ok", blocked=True, waited_s=round(time.monotonic() - waited, 3))

    def capture(self, args: dict[str, Any], deadline: float) -> dict[str, Any]:
        entire = flag(args, "capture_entire")
        self.require_session()
        argv = ["capture-pane", "-p", "-t", SESSION]
        if entire:
            argv += ["-S", "-"]
        code, out = self.client(argv, deadline)
        if code != 0:
            raise ToolError(f"tmux capture-pane failed: {self.explain(out, code)}")
        # The screen's blank rows below the last line of text are left out.
        lines = out.split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        text = "\n".join(lines) + "\n" if lines else ""
        capture = OutputCapture(self.config.max_output_bytes)
        capture.feed(text.encode())
        metadata: dict[str, Any] = {"capture_entire": entire, "truncated": capture.truncated}
        if args.get("action") not in ACTIONS:
            metadata["action"] = "capture"
        return answer(capture.text(), **metadata)

    def stream(self, args: dict[str, Any]) -> dict[str, Any]:
        limit = integer(args, "max_bytes", self.config.max_output_bytes, 1, 1 << 30)
        if not os.path.exists(self.cast):
            raise ToolError("no tmux recording: start a session with action 'start'")
        if flag(args, "reset"):
            self.cursor = 0
        data, start, size = read_lines(self.cast, self.cursor, limit)
        self.cursor = start + len(data)
        recorder = self.recorder
        return answer(
            data.decode("utf-8", "replace"),
            stream=True,
            offset=self.cursor,
            start_offset=start,
            bytes=len(data),
            lines=data.count(b"\n"),
            more=self.cursor < size,
            recording_bytes=size,
            recording_capped=bool(recorder and recorder.capped),
            session_running=self.running(),
        )

    # ---- tmux client commands

    def explain(self, out: str, code: int | None) -> str:
        if not self.running():
            return "the tmux session has ended; start a new one with action 'start'"
        return out.strip() or f"exit {code}"

    def client(
        self, argv: list[str], deadline: float, wait: bool = False
    ) -> tuple[int | None, str]:
        """Run one tmux client command; (exit status, None on timeout; its output).

        Spawned like every command of the slot (``Runner.spawn``) and supervised by the same
        loop, so orphans are reaped, the disk bound holds and a cancel ends it while it runs.
        ``wait``: a timeout or a cancel kills the client only (a blocking wait); otherwise
        whatever it started too.
        """
        assert self.program is not None
        runner = self.runner
        started = time.monotonic()
        timeout = (
            max(0.0, deadline - started)
            if wait
            else min(CLIENT_TIMEOUT_S, max(1.0, deadline - started))
        )
        since = boottime_ticks()
        out_r, out_w = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            pid = runner.spawn([self.program, *argv], null, out_w, env=self.env)
        except OSError as exc:
            os.close(out_r)
            raise ToolError(f"could not run tmux: {exc.strerror}") from None
        finally:
            os.close(out_w)
            os.close(null)
        capture = OutputCapture(CLIENT_OUTPUT_BYTES)
        try:
            outcome = runner.supervise(pid, out_r, -1, b"", capture, timeout, started)
        finally:
            os.close(out_r)
        code: int | None = None
        if not outcome.stopped:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        elif wait:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        else:
            runner.kill_tree(pid, since)
        runner.reap()
        if "disk" in outcome.limit_hit:
            # As for any command: a writer left running would go on filling the disk.
            runner.kill_tree(os.getpid(), 0)
            raise ToolError(
                f"workspace disk limit of {self.config.disk_bytes // (1024 * 1024)} MiB "
                "exceeded; every process of the slot was stopped, the tmux session too; "
                "delete files to continue"
            )
        if outcome.cancelled:
            # A cancelled wait stops waiting; what the keys started runs on in the session.
            kept = "; the keys were sent, and what they started still runs in the session"
            raise ToolError(CANCELLED + (kept if wait else ""))
        if code is None and not wait:
            raise ToolError(f"tmux did not answer within {timeout:g}s")
        return code, capture.text()


def tmux(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The ``tmux`` tool; the slot's session is made on first use and kept by the agent."""
    if agent.tmux is None:
        agent.tmux = Tmux(agent)
    return agent.tmux.call(args, timeout)
