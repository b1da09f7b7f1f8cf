"""The program the stateful Python interpreter runs: read code, run it in one namespace, answer.

``repl.StatefulPython`` starts it as the sandbox's python3 with ``-c`` and a one-line bootstrap
that imports this module from the runtime directory (``repl.BOOTSTRAP``); it is a plain
``python3`` otherwise, with the site packages the ``python`` tool sees. Its arguments name two
private descriptors and the longest value or traceback it answers (characters):

- requests arrive on the first, one frame each (``framing``): ``{"code": str}``;
- each answer goes to the second as a newline, then one frame: ``{}``, ``{"value": repr}``
  when the code ends with an expression whose value is not None, or ``{"error": traceback,
  "memory": bool}`` when it raised. The newline is what ends the agent's supervision loop,
  as the stateful shell's status line does (``processes.Runner.supervise``); the frame
  follows it on the same pipe.

Standard output and error are the descriptors 1 and 2 the agent reads as any command's, so
output of ``print`` and of subprocesses (``os.system``) is captured alike; both are flushed
before each answer. ``SystemExit`` ends the interpreter, as it ends a REPL.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import os
import sys
import traceback
import types

from .framing import encode_frame, read_frame

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Frames of this module are left out of a traceback: the caller's code starts below them.
DRIVER_GLOBALS = globals()


def bounded(text: str, limit: int) -> str:
    """``text``, or its head and tail of ``limit`` characters with what was left out counted."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[len(text) - tail :]}"


def describe(exc: BaseException) -> str:
    """The traceback a REPL prints for ``exc``, without this module's frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals is DRIVER_GLOBALS:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def run_cell(source: str, name: str, namespace: dict[str, Any], limit: int) -> dict[str, Any]:
    """Run ``source`` in ``namespace``; the answer's body (see the module's docstring)."""
    # Kept where tracebacks and ``inspect`` look for source: lines of earlier cells show too.
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    try:
        tree = ast.parse(source, name, "exec")
    except Exception as exc:  # a SyntaxError, or a RecursionError of code nested too deep
        return {"error": bounded("".join(traceback.format_exception_only(exc)), limit)}
    try:
        final = tree.body[-1] if tree.body else None
        last = None
        if isinstance(final, ast.Expr):
            # The final expression is evaluated apart, for its value.
            tree.body.pop()
            last = ast.Expression(final.value)
        # dont_inherit: this module's ``from __future__`` imports are not the code's.
        exec(compile(tree, name, "exec", dont_inherit=True), namespace)
        if last is None:
            return {}
        value = eval(compile(last, name, "eval", dont_inherit=True), namespace)
        if value is None:
            return {}
        builtins._ = value  # type: ignore[attr-defined]  # as a REPL keeps the last value
        text = repr(value)
        sys.stdout.write(text + "\n")
        return {"value": bounded(text, limit)}
    except SystemExit:
        raise
    except BaseException as exc:
        # As a REPL leaves them, for ``pdb.pm()`` and ``traceback.print_last()``.
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
        return {"error": bounded(describe(exc), limit), "memory": isinstance(exc, MemoryError)}


def flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()  # type: ignore[union-attr]
        except Exception:
            pass  # closed or replaced by the code: what it printed there is its own


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def forget_bootstrap(runtime_dir: str) -> None:
    """Leave no trace of the agent's package: the code's own ``agent`` module imports."""
    if runtime_dir in sys.path:
        sys.path.remove(runtime_dir)
    for name in [n for n in sys.modules if n == "agent" or n.startswith("agent.")]:
        del sys.modules[name]


def main() -> None:
    runtime_dir, request_fd, reply_fd, limit = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    # Not inherited by what the code starts: only this process speaks to the agent.
    os.set_inheritable(request_fd, False)
    os.set_inheritable(reply_fd, False)
    forget_bootstrap(runtime_dir)
    sys.argv = [""]
    # The code's namespace is a __main__ module of its own (pickle and dataclasses look
    # classes up there), not this module's globals.
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"] = main_module
    # Written line by line, as a terminal's python writes: print() and the output of a
    # subprocess keep the order they were written in.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    me = os.getpid()
    # Sent when there is no memory left to encode the answer itself.
    no_memory = b"\n" + encode_frame({"error": "MemoryError (no memory left)", "memory": True})
    number = 0
    while True:
        try:
            request = read_frame(request_fd)
        except OSError:
            return  # the code closed the descriptor: no call can reach this interpreter again
        if request is None:
            return  # the agent is gone
        number += 1
        code = str(request.get("code", ""))
        try:
            answer = run_cell(code, f"<cell-{number}>", vars(main_module), limit)
            data = b"\n" + encode_frame(answer)
        except MemoryError:
            data = no_memory  # even the traceback or the answer did not fit
        flush()
        if os.getpid() != me:
            os._exit(0)  # a fork of the code that ran to its end: only the interpreter answers
        try:
            write_all(reply_fd, data)
        except OSError:
            return
