"""The stateful shell: one persistent shell per slot, whose directory and variables survive calls.

Commands are sent on the shell's stdin as ``eval '<quoted>'`` followed by a status line
written to a private descriptor, so a syntax error in a command ends that command only.
A command that times out (or is cancelled) kills the shell; the next call starts a fresh one and
says so.
"""

from __future__ import annotations

import os
import time

from .output import CommandOutput
from .processes import boottime_ticks
from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .processes import Runner

# The descriptor the status line goes to: high enough that commands do not use it by chance
# (a POSIX sh only handles single-digit descriptors in redirections).
STATUS_FD_BASH = 87
STATUS_FD_SH = 9


def shell_quote(text: str) -> str:
    """POSIX single-quoting: safe for any text without NUL bytes."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


class StatefulShell:
    """The slot's persistent shell, started on first use and after it was lost."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.pid = -1
        self.stdin_w = -1
        self.out_r = -1
        # The shell's stderr, apart from its stdout in the split form (-1: merged).
        self.err_r = -1
        self.status_r = -1
        self.status_fd = STATUS_FD_SH
        # Set when the shell was lost, so the next call can report that its state is gone.
        self.restarted = False

    def close(self) -> None:
        self.runner.watched.pop(self.pid, None)
        for fd in (self.stdin_w, self.out_r, self.err_r, self.status_r):
            if fd >= 0:
                os.close(fd)
        self.pid = self.stdin_w = self.out_r = self.err_r = self.status_r = -1

    def start(self) -> None:
        shell = self.runner.config.shell
        bash = shell.endswith("bash")
        status_fd = STATUS_FD_BASH if bash else STATUS_FD_SH
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if self.runner.config.split_output else (-1, -1)
        status_r, status_w = os.pipe()
        argv = [shell, "--noprofile", "--norc"] if bash else [shell]
        try:
            extra = [(os.POSIX_SPAWN_DUP2, status_w, status_fd)]
            self.pid = self.runner.spawn(argv, in_r, out_w, extra, err_fd=err_w)
        except OSError:
            for fd in (in_w, out_r, err_r, status_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w, status_w):
                if fd >= 0:
                    os.close(fd)
        self.stdin_w, self.out_r, self.err_r, self.status_r = in_w, out_r, err_r, status_r
        self.status_fd = status_fd
        # Killing the whole slot (disk bound) reaps the shell too: then it is gone for us.
        self.runner.watched[self.pid] = self.close

    def run(self, command: str, timeout: float) -> dict[str, Any]:
        runner = self.runner
        started = time.monotonic()
        restarted = False
        if self.pid < 0:
            restarted = self.restarted
            self.start()
        since = boottime_ticks()
        script = (
            f"eval {shell_quote(command)} </dev/null\nprintf '%s\\n' \"$?\" >&{self.status_fd}\n"
        )
        try:
            os.write(self.stdin_w, script.encode())
        except BrokenPipeError:
            self.kill(since)
            raise ToolError("the stateful shell died; the next call starts a new one") from None
        output = CommandOutput(runner.config.max_output_bytes, self.err_r >= 0)
        pid = self.pid
        outcome = runner.supervise(
            pid,
            self.out_r,
            -1,
            b"",
            output.stdout,
            timeout,
            started,
            done_r=self.status_r,
            err_r=self.err_r,
            err_capture=output.stderr,
        )
        limit_hit = outcome.limit_hit
        status_text = outcome.status_line.decode(errors="replace").strip()
        killed = 0
        exit_code: int | None
        shell_exited = False
        if outcome.stopped:
            killed = self.kill(since)
            self.restarted = True
            exit_code = None
        elif status_text.isdigit():
            exit_code = int(status_text)
        else:
            # No status line: the command ended the shell itself (``exit 4``).
            _, status = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
            shell_exited = True
            self.close()
            self.restarted = True
        runner.reap()
        result = runner.finish(
            output, exit_code, limit_hit, killed, started, timeout, outcome.cancelled
        )
        result["metadata"]["stateful"] = True
        result["metadata"]["shell_restarted"] = restarted
        if shell_exited:
            result["metadata"]["shell_exited"] = True
            result["error"] = (
                result["error"] + "; " if result["error"] else ""
            ) + "the stateful shell exited; the next call starts a new one"
            result["success"] = False
        elif outcome.stopped:
            result["error"] += "; the stateful shell was restarted, its state is lost"
        return result

    def kill(self, since: int) -> int:
        """Kill the shell and what the current command started; returns how many died."""
        killed = self.runner.end_child(self.pid, since)
        self.close()
        return killed
