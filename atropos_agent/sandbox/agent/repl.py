"""The stateful Python tool: one persistent interpreter per slot, whose namespace survives calls.

Imported on the first ``python_stateful`` call only (``tools.py``), and the interpreter is
started then too: an idle slot carries neither. It is the sandbox's python3 running
``repl_driver``, started through ``Runner.spawn`` like every command, so it runs in the
slot's isolation, as its uid, with its environment, in /workspace, under its rlimits, and is
the agent's child (reaped by the agent, ``Runner.watched``), as the stateful shell is.

A call sends the code as one frame on the interpreter's request pipe and is supervised as any
command (``Runner.supervise``: its output pipes, the timeout, a cancel, the disk bound, orphans
reaped); the driver's answer, a newline and a frame on its reply pipe, ends the supervision as
the shell's status line does. An exception in the code is an answer: the interpreter and its
state live on. A timeout, a cancel, the disk bound and the interpreter's own exit end it (with
what it started during the call); the answer says that its state is lost, and the next call
starts a new one and says so (``interpreter_restarted``).
"""

from __future__ import annotations

import os
import select
import time

from .framing import FRAME_HEADER, body_length, decode_body, encode_frame
from .output import CommandOutput
from .processes import boottime_ticks
from .results import FILE_SIZE_MARKERS, MEMORY_MARKERS, MIB, PROCESS_MARKERS, ToolError, failure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .main import Agent
    from .processes import Runner

# The runtime directory the agent runs from (``sandbox/runtime.py``): the driver imports
# itself from there, and then forgets it (``repl_driver.forget_bootstrap``).
RUNTIME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOTSTRAP = "import sys; sys.path.insert(0, sys.argv[1]); import agent.repl_driver as d; d.main()"
# How long the rest of an answer may take once its first bytes arrived (it is written at once).
ANSWER_GRACE_S = 5.0
STOPPED = "the Python interpreter was stopped, its state is lost (the next call starts a new one)"
EXITED = "the Python interpreter exited, its state is lost (the next call starts a new one)"


def traceback_limits(text: str) -> list[str]:
    """Limits a traceback shows the code hit (the markers a command's output is read for)."""
    lowered = text.lower().encode()
    seen = []
    if any(marker in lowered for marker in MEMORY_MARKERS):
        seen.append("memory")
    if any(marker in lowered for marker in PROCESS_MARKERS):
        seen.append("processes")
    if any(marker in lowered for marker in FILE_SIZE_MARKERS):
        seen.append("disk")
    return seen


class StatefulPython:
    """The slot's persistent interpreter, started on first use and after it was lost."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.pid = -1
        self.request_w = self.reply_r = self.out_r = -1
        # The interpreter's stderr, apart from its stdout in the split form (-1: merged).
        self.err_r = -1
        # Set when the interpreter was lost, so the next call can say that its state is gone.
        self.lost = False

    def close(self) -> None:
        self.runner.watched.pop(self.pid, None)
        for fd in (self.request_w, self.reply_r, self.out_r, self.err_r):
            if fd >= 0:
                os.close(fd)
        self.pid = self.request_w = self.reply_r = self.out_r = self.err_r = -1

    def gone(self) -> None:
        """Reaped by the runner (every process of the slot was stopped): lost."""
        self.close()
        self.lost = True

    def start(self) -> None:
        runner = self.runner
        config = runner.config
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if config.split_output else (-1, -1)
        stdin = os.open(os.devnull, os.O_RDONLY)
        # The interpreter's ends keep their numbers across the spawn (named in its argv); the
        # driver makes them close-on-exec again at once.
        os.set_inheritable(request_r, True)
        os.set_inheritable(reply_w, True)
        argv = [
            *(config.python, "-c", BOOTSTRAP, RUNTIME_DIR),
            *(str(request_r), str(reply_w), str(config.max_output_bytes)),
        ]
        try:
            self.pid = runner.spawn(argv, stdin, out_w, err_fd=err_w)
        except OSError as exc:
            for fd in (request_w, reply_r, out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            raise ToolError(f"could not start {config.python}: {exc.strerror}") from None
        finally:
            for fd in (request_r, reply_w, out_w, err_w, stdin):
                if fd >= 0:
                    os.close(fd)
        self.request_w, self.reply_r, self.out_r, self.err_r = request_w, reply_r, out_r, err_r
        # Killing the whole slot (disk bound) reaps the interpreter too: then it is lost.
        runner.watched[self.pid] = self.gone

    def reset(self) -> bool:
        """End the interpreter (whether it lives or not, the next one starts afresh); returns
        whether one was running."""
        self.runner.reap()
        running = self.pid > 0
        if running:
            self.kill(boottime_ticks())
        self.lost = False
        return running

    def run(self, code: str, timeout: float) -> dict[str, Any]:
        runner = self.runner
        started = time.monotonic()
        runner.reap()  # an interpreter that died since the last call is forgotten here
        restarted = False
        if self.pid < 0:
            self.start()
            restarted, self.lost = self.lost, False
        pid = self.pid
        since = boottime_ticks()
        output = CommandOutput(runner.config.max_output_bytes, self.err_r >= 0)
        stdout_capture, stderr_capture = runner.captures(output)
        # The frame is fed as the pipe takes it (a large one cannot block the agent), through
        # a duplicate of the request pipe that the supervision closes when it is written.
        outcome = runner.supervise(
            pid,
            self.out_r,
            os.dup(self.request_w),
            encode_frame({"code": code}),
            stdout_capture,
            timeout,
            started,
            done_r=self.reply_r,
            err_r=self.err_r,
            err_capture=stderr_capture,
        )
        limit_hit = list(outcome.limit_hit)
        answer: dict[str, Any] | None = None
        exit_code: int | None = None
        killed = 0
        exited = False
        if not outcome.stopped and outcome.status_line[:1] == b"\n":
            answer = self.read_answer(outcome.status_line[1:])
        if outcome.stopped or (answer is None and outcome.status_line):
            # Stopped, or an answer cut short: the interpreter cannot be trusted to be in step.
            killed = self.kill(since)
        elif answer is None:
            # No answer: the code ended the interpreter (sys.exit, os._exit, a crash).
            _, status = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
            exited = True
            self.close()
        else:
            exit_code = 1 if "error" in answer else 0
            if answer.get("memory"):
                limit_hit.append("memory")
            limit_hit += traceback_limits(answer.get("error", ""))
        runner.reap()
        result = runner.finish(
            output, exit_code, limit_hit, killed, started, timeout, outcome.cancelled
        )
        metadata = result["metadata"]
        metadata["stateful"] = True
        metadata["interpreter_restarted"] = restarted
        if answer is not None:
            if "value" in answer:
                metadata["value"] = answer["value"]
            if "error" in answer:
                result["success"] = False
                result["error"] = answer["error"].rstrip("\n")
                if "memory" in metadata.get("limit_hit", ()):
                    mib = runner.config.memory_bytes // MIB
                    result["error"] += f"\n(memory limit of {mib} MiB; the state is kept)"
        if self.pid != pid:
            # Ended by this call, or by the kill of the whole slot at the disk bound.
            self.lost = True
            metadata["state_lost"] = True
            result["success"] = False
            note = EXITED if exited else STOPPED
            result["error"] = f"{result['error']}; {note}" if result["error"] else note
        return result

    def read_answer(self, data: bytes) -> dict[str, Any] | None:
        """The answer's frame, begun with ``data``; None when it does not come whole."""
        buffer = bytearray(data)
        deadline = time.monotonic() + ANSWER_GRACE_S
        try:
            while len(buffer) < FRAME_HEADER.size:
                self.read_more(buffer, deadline)
            end = FRAME_HEADER.size + body_length(bytes(buffer[: FRAME_HEADER.size]))
            while len(buffer) < end:
                self.read_more(buffer, deadline)
            answer = decode_body(bytes(buffer[FRAME_HEADER.size : end]))
        except (OSError, ValueError, EOFError):
            return None
        return answer if isinstance(answer, dict) else None

    def read_more(self, buffer: bytearray, deadline: float) -> None:
        ready, _, _ = select.select([self.reply_r], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(self.reply_r, 1 << 20) if ready else b""
        if not chunk:
            raise EOFError("the answer was cut short")
        buffer += chunk

    def kill(self, since: int) -> int:
        """Kill the interpreter and what the current call started; returns how many died."""
        killed = self.runner.end_child(self.pid, since)
        self.close()
        return killed


def python_stateful(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The tool: ``{code}`` runs in the slot's interpreter; ``{reset: true}`` (with or without
    code) starts a fresh one first."""
    reset = args.get("reset", False)
    code = args.get("code", args.get("source"))
    try:
        if not isinstance(reset, bool):
            raise ToolError("'reset' must be true or false")
        if not (isinstance(code, str) or (reset and code is None)):
            raise ToolError("'code' must be a string of Python source")
        if code is not None and "\x00" in code:
            raise ToolError("'code' must not contain NUL characters")
        if agent.python_repl is None:
            agent.python_repl = StatefulPython(agent.runner)
        repl = agent.python_repl
        if not reset:
            return repl.run(str(code), timeout)
        was_running = repl.reset()
        if code is None:
            repl.start()
            return {
                "success": True,
                "output": "a new Python interpreter was started; the previous state is gone",
                "error": "",
                "metadata": {"stateful": True, "reset": True, "was_running": was_running},
            }
        result = repl.run(code, timeout)
        result["metadata"].update(reset=True, was_running=was_running)
        return result
    except ToolError as exc:
        return failure(str(exc), stateful=True)
