"""The ``python_stateful`` tool through the real server: one persistent interpreter per slot,
under the slot's isolation and limits, lost (and said so) on a timeout or a cancel."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from atropos_agent.sandbox.agent.results import CANCELLED
from harness.processes import CONNECT_PROBE, host_processes_matching, unique_sleep
from harness.servers import ExecutorServer, SandboxServer
from tests.executor_support import release, wait_for

LONG_S = 60.0
# How the interpreter shows in a process list (its bootstrap imports the driver by name).
DRIVER = "agent.repl_driver"


def py(
    sandbox: SandboxServer,
    slot: str,
    code: str | None = None,
    timeout: float | None = None,
    **args: Any,
) -> dict[str, Any]:
    if code is not None:
        args["code"] = code
    return sandbox.run(slot, "python_stateful", timeout=timeout, **args)


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["success"] is True, result
    assert result["metadata"]["stateful"] is True, result
    return result


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_idle_slot_has_no_interpreter_until_first_use(sandbox: SandboxServer) -> None:
    slot = "slot_3"  # used by no other test of this module
    assert DRIVER not in sandbox.sh(slot, "ps -eo args")["output"]
    first = ok(py(sandbox, slot, "started = True"))
    assert first["metadata"]["interpreter_restarted"] is False
    processes = sandbox.sh(slot, "ps -eo args")["output"]
    assert processes.count(DRIVER) == 1, processes


def test_a_slot_reset_ends_the_interpreter(sandbox: SandboxServer) -> None:
    slot = "slot_3"
    sleep = unique_sleep()
    code = f"import subprocess\nchild = subprocess.Popen({sleep.split()!r})\nkept = 1"
    assert ok(py(sandbox, slot, code))
    assert host_processes_matching(sleep) != []
    assert sandbox.client.post("/reset", json={"slot_id": slot}).json()["success"] is True
    assert host_processes_matching(sleep) == []
    assert DRIVER not in sandbox.sh(slot, "ps -eo args")["output"]
    assert "NameError" in py(sandbox, slot, "kept")["error"]


def test_state_and_the_final_expression_value(sandbox: SandboxServer) -> None:
    assert ok(py(sandbox, "slot_0", "x = 1\nimport math\ndef double(n):\n    return 2 * n"))
    assert ok(py(sandbox, "slot_0", "x += 1"))["output"] == ""
    value = ok(py(sandbox, "slot_0", "print('before')\ndouble(x) + math.floor(2.5)"))
    assert value["output"] == "before\n6"
    assert value["metadata"]["value"] == "6"
    text = ok(py(sandbox, "slot_0", "'hi' + str(x)"))
    assert text["output"] == "'hi2'" and text["metadata"]["value"] == "'hi2'"
    # None is not printed, as in a REPL; nor is the value of anything but a final expression.
    for code in ("None", "print('p')", "y = x", "x\nz = 3"):
        result = ok(py(sandbox, "slot_0", code))
        assert "value" not in result["metadata"], (code, result)
    assert ok(py(sandbox, "slot_0", "y, z"))["output"] == "(2, 3)"
    assert ok(py(sandbox, "slot_0", "_"))["output"] == "(2, 3)"  # the last value, as in a REPL


def test_stdout_stderr_and_output_of_subprocesses(sandbox: SandboxServer) -> None:
    code = (
        "import os, subprocess, sys\n"
        "print('out')\n"
        "print('err', file=sys.stderr)\n"
        "os.system('echo shell; echo shell-err >&2')\n"
        "subprocess.run(['echo', 'sub'])\n"
        "print('no newline', end='')"
    )
    result = ok(py(sandbox, "slot_1", code))
    # stdout in the order written (print() and the subprocesses), then stderr: as `python`.
    assert result["output"] == "out\nshell\nsub\nno newline\n[stderr]\nerr\nshell-err", result
    assert result["metadata"]["stdout_bytes"] == len("out\nshell\nsub\nno newline")
    # stdin is /dev/null, as for every command.
    assert "EOFError" in py(sandbox, "slot_1", "input()")["error"]


def test_an_exception_keeps_the_state(sandbox: SandboxServer) -> None:
    assert ok(py(sandbox, "slot_1", "kept = 5\ndef fails():\n    return 1 / 0"))
    result = py(sandbox, "slot_1", "print('partial')\nfails()")
    assert result["success"] is False
    assert result["output"] == "partial"
    error = result["error"]
    assert error.startswith("Traceback (most recent call last):"), error
    assert "ZeroDivisionError: division by zero" in error
    assert "return 1 / 0" in error  # the source of an earlier call's function is shown
    assert "repl_driver" not in error  # the driver's own frames are left out
    assert result["metadata"]["exit_code"] == 1
    assert "state_lost" not in result["metadata"]

    syntax = py(sandbox, "slot_1", "if (")
    assert syntax["success"] is False and "SyntaxError" in syntax["error"], syntax
    assert "ast.py" not in syntax["error"] and "Traceback" not in syntax["error"]

    assert ok(py(sandbox, "slot_1", "kept"))["output"] == "5"


def test_a_fork_that_runs_to_the_end_of_the_code_does_not_answer(sandbox: SandboxServer) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    role = 'child'\n"
        "    print('child')\n"
        "else:\n"
        "    role = 'parent'\n"
        "    time.sleep(0.3)\n"
        "    os.wait()"
    )
    assert ok(py(sandbox, "slot_1", code, timeout=10))["output"] == "child"
    # One answer per call, the interpreter's: the next calls get their own, in order.
    for number in range(3):
        assert ok(py(sandbox, "slot_1", f"role, {number}"))["output"] == f"('parent', {number})"


def test_a_timeout_kills_the_interpreter_and_says_its_state_is_lost(
    sandbox: SandboxServer,
) -> None:
    sleep = unique_sleep()
    assert ok(py(sandbox, "slot_2", "lost = 1"))
    code = f"import subprocess, time\nsubprocess.Popen({sleep.split()!r})\ntime.sleep(30)"
    result = py(sandbox, "slot_2", code, timeout=1)
    assert result["success"] is False
    assert result["metadata"]["timed_out"] is True
    assert result["metadata"]["state_lost"] is True
    assert result["error"] == (
        "Command timed out after 1s; the Python interpreter was stopped, its state is lost "
        "(the next call starts a new one)"
    )
    assert host_processes_matching(sleep) == []  # its whole tree

    fresh = py(sandbox, "slot_2", "lost")
    assert "NameError" in fresh["error"], fresh
    assert fresh["metadata"]["interpreter_restarted"] is True
    assert ok(py(sandbox, "slot_2", "1"))["metadata"]["interpreter_restarted"] is False


def test_exit_ends_the_interpreter(sandbox: SandboxServer) -> None:
    assert ok(py(sandbox, "slot_2", "gone = 1"))
    result = py(sandbox, "slot_2", "import sys\nprint('bye')\nsys.exit(3)")
    assert result["success"] is False
    assert result["output"] == "bye"
    assert result["metadata"]["exit_code"] == 3
    assert result["metadata"]["state_lost"] is True
    assert "the Python interpreter exited, its state is lost" in result["error"]
    assert py(sandbox, "slot_2", "gone")["metadata"]["interpreter_restarted"] is True


def test_reset_starts_afresh(sandbox: SandboxServer) -> None:
    assert ok(py(sandbox, "slot_2", "w = 1"))
    reset = ok(py(sandbox, "slot_2", reset=True))
    assert reset["output"] == "a new Python interpreter was started; the previous state is gone"
    assert reset["metadata"]["reset"] is True and reset["metadata"]["was_running"] is True
    assert "NameError" in py(sandbox, "slot_2", "w")["error"]
    both = ok(py(sandbox, "slot_2", "w = 2\nw", reset=True))
    assert both["output"] == "2" and both["metadata"]["reset"] is True

    for args in ({}, {"code": 3}, {"reset": "yes", "code": "1"}, {"code": "a\x00b"}):
        bad = sandbox.run("slot_2", "python_stateful", **args)
        assert bad["success"] is False and "'" in bad["error"], (args, bad)
    assert ok(py(sandbox, "slot_2", "w"))["output"] == "2"  # a refused call changes nothing


def test_a_memory_bomb_reports_the_memory_limit_and_keeps_the_state(
    sandbox: SandboxServer,
) -> None:
    assert ok(py(sandbox, "slot_0", "survives = 7"))
    result = py(sandbox, "slot_0", "bomb = [0] * 10**10")
    assert result["success"] is False
    assert result["metadata"]["limit_hit"] == ["memory"]
    assert "MemoryError" in result["error"]
    assert result["error"].endswith("(memory limit of 2048 MiB; the state is kept)")
    assert ok(py(sandbox, "slot_0", "survives"))["output"] == "7"


def test_isolation_is_the_python_tools(sandbox: SandboxServer) -> None:
    host_file = sandbox.data_dir / "slots" / "slot_0" / "workspace" / "host-visible"
    host_file.write_text("secret")
    probe = (
        "import os\n"
        f"print(os.getuid(), os.getgid(), os.getcwd(), os.environ['HOME'], "
        f"os.path.exists({__file__!r}), os.path.exists({str(host_file)!r}), "
        "len([p for p in os.listdir('/proc') if p.isdigit()]) < 12)"
    )
    fresh = sandbox.run("slot_1", "python", code=probe)
    stateful = ok(py(sandbox, "slot_1", probe))
    assert (
        stateful["output"] == fresh["output"] == "1000 1000 /workspace /workspace False False True"
    )
    assert stateful["metadata"]["sandboxed"] is True
    connected = ok(py(sandbox, "slot_1", CONNECT_PROBE.format(port=sandbox.port)))
    assert connected["output"] == "connected"  # the positive control of the test below


def test_no_network_on_a_server_without_it(sandbox_factory: Callable[..., SandboxServer]) -> None:
    isolated = sandbox_factory(slots=1, args=["--no-network"])
    code = CONNECT_PROBE.format(port=isolated.port)  # listening on the host's loopback
    result = ok(py(isolated, "slot_0", code))
    assert result["output"].startswith("refused"), result
    assert result["metadata"]["network_isolated"] is True
    assert isolated.run("slot_0", "python", code=code)["output"].startswith("refused")


def test_cancel_ends_the_interpreter(
    sandbox: SandboxServer, background: ThreadPoolExecutor
) -> None:
    assert ok(py(sandbox, "slot_0", "before_cancel = 1"))
    sleep = unique_sleep()
    code = f"import subprocess\nprint('started', flush=True)\nsubprocess.run({sleep.split()!r})"
    call = background.submit(py, sandbox, "slot_0", code, LONG_S)
    wait_for(lambda: bool(host_processes_matching(sleep)), 10, sleep)
    response = sandbox.client.post("/cancel", json={"slot_id": "slot_0"})
    assert response.json() == {"slot_id": "slot_0", "cancelled": True}
    result = call.result(timeout=5)
    assert result["success"] is False
    assert result["output"] == "started"
    assert result["error"].startswith(CANCELLED)
    assert result["error"].endswith("its state is lost (the next call starts a new one)")
    assert result["metadata"]["cancelled"] is True and result["metadata"]["state_lost"] is True
    assert host_processes_matching(sleep) == []
    after = py(sandbox, "slot_0", "before_cancel")
    assert "NameError" in after["error"] and after["metadata"]["interpreter_restarted"] is True


def test_through_the_executor(executor: ExecutorServer) -> None:
    names = [tool["function"]["name"] for tool in executor.client.get("/tools").json()["tools"]]
    assert "python_stateful" in names
    trajectory = f"pystate-{random.randrange(10**9)}"
    try:
        first = executor.call(trajectory, "python_stateful", code="counter = 41")
        assert first["success"] is True, first
        second = executor.call(trajectory, "python_stateful", code="counter += 1\ncounter")
        assert second["success"] is True, second
        assert second["output"] == "42" and second["metadata"]["value"] == "42"
        assert second["metadata"]["stateful"] is True
    finally:
        release(executor, trajectory)
