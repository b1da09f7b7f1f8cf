"""Command and file results in the old service's shapes, through the real sandbox server.

../shared/PROTOCOL.md ("Behaviour details of the old service") gives them: stdout, then
``"\\n[stderr]\\n"`` and stderr, stripped; ``error`` ``""`` / ``"Exit code: N"`` /
``"Command timed out after <T>s"``; ``metadata`` with ``exit_code``, ``sandboxed``,
``network_isolated`` (and ``timeout``, ``stateful``, ``size``). Ours stays beside them.
The raw form (``terminal_output: merged``) is tested at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from atropos_agent.sandbox.__main__ import parse_args
from atropos_agent.sandbox.settings import SandboxSettings
from harness.servers import SandboxServer

Factory = Callable[..., SandboxServer]


def old_view(result: dict[str, Any], *keys: str) -> tuple[Any, ...]:
    """``success``, ``output``, ``error`` and the named metadata keys of a result."""
    meta = result["metadata"]
    return (result["success"], result["output"], result["error"], *(meta[key] for key in keys))


# --------------------------------------------------------------------------- terminal


def test_terminal_output_is_stdout_then_stderr_stripped(sandbox: SandboxServer) -> None:
    keys = ("exit_code", "sandboxed", "network_isolated")
    both = sandbox.sh("slot_0", "echo out; echo err >&2")
    assert old_view(both, *keys) == (True, "out\n\n[stderr]\nerr", "", 0, True, False)
    # Ours beside the old keys: the streams' sizes.
    assert (both["metadata"]["stdout_bytes"], both["metadata"]["stderr_bytes"]) == (4, 4)
    # Not interleaved: all of stdout comes first, whatever the order of the writes.
    order = sandbox.sh("slot_0", "echo e1 >&2; echo o1; echo e2 >&2; echo o2")
    assert order["output"] == "o1\no2\n\n[stderr]\ne1\ne2"

    plain = sandbox.run("slot_0", "bash", command="echo hello")
    assert old_view(plain, *keys) == (True, "hello", "", 0, True, False)
    only_err = sandbox.sh("slot_0", "echo oops >&2")
    assert old_view(only_err, "exit_code") == (True, "oops", "", 0)
    padded = sandbox.sh("slot_0", "printf '\\n\\n  spaced  \\n\\n'")
    assert padded["output"] == "spaced"


def test_non_zero_exit_is_exit_code_n(sandbox: SandboxServer) -> None:
    keys = ("exit_code", "sandboxed", "network_isolated")
    assert old_view(sandbox.sh("slot_0", "exit 3"), *keys) == (
        False,
        "",
        "Exit code: 3",
        3,
        True,
        False,
    )
    failed = sandbox.sh("slot_0", "echo x; echo why >&2; exit 42")
    assert old_view(failed, "exit_code") == (False, "x\n\n[stderr]\nwhy", "Exit code: 42", 42)
    # Killed by a signal: the shell's 128 + N, and ours (``signal``) beside it.
    killed = sandbox.sh("slot_0", "kill -9 $$")
    assert old_view(killed, "exit_code", "signal") == (False, "", "Exit code: 137", 137, 9)


def test_timeout_keeps_what_was_printed(sandbox: SandboxServer) -> None:
    result = sandbox.sh("slot_1", "echo partial; echo also >&2; sleep 5", timeout=1)
    assert old_view(result, "exit_code", "timeout", "sandboxed") == (
        False,
        "partial\n\n[stderr]\nalso",
        "Command timed out after 1s",
        -1,
        True,
        True,
    )
    meta = result["metadata"]
    assert meta["timed_out"] is True and meta["limit_hit"] == ["timeout"]
    fractional = sandbox.sh("slot_1", "sleep 5", timeout=1.5)
    assert old_view(fractional, "exit_code", "timeout") == (
        False,
        "",
        "Command timed out after 1.5s",
        -1,
        True,
    )
    assert "timeout" not in sandbox.sh("slot_1", "true")["metadata"]


def test_empty_command_runs_and_a_missing_one_is_an_error(sandbox: SandboxServer) -> None:
    for tool in ("terminal", "bash", "terminal_stateful"):
        for command in ("", "   "):
            empty = sandbox.run("slot_2", tool, command=command)
            assert old_view(empty, "exit_code") == (True, "", "", 0), (tool, command)
        for args in ({}, {"command": None}, {"command": 7}):
            missing = sandbox.run("slot_2", tool, **args)
            assert missing["success"] is False, (tool, args)
            assert missing["error"] == "'command' must be a string"


def test_python_answers_in_the_old_form(sandbox: SandboxServer) -> None:
    code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nsys.exit(5)\n"
    result = sandbox.run("slot_3", "python", code=code)
    assert old_view(result, "exit_code", "sandboxed") == (
        False,
        "to out\n\n[stderr]\nto err",
        "Exit code: 5",
        5,
        True,
    )


def test_stateful_terminal_answers_in_the_old_form(sandbox: SandboxServer) -> None:
    slot = "slot_3"
    keys = ("exit_code", "stateful", "sandboxed", "network_isolated")
    first = sandbox.run(slot, "terminal_stateful", command="cd /tmp; X=7; echo set; echo n >&2")
    assert old_view(first, *keys) == (True, "set\n\n[stderr]\nn", "", 0, True, True, False)
    second = sandbox.run(slot, "terminal_stateful", command="echo $X; pwd")
    assert old_view(second, *keys) == (True, "7\n/tmp", "", 0, True, True, False)
    # The old executor's name for it.
    old_name = sandbox.run(slot, "bash_stateful", command="echo $X; false")
    assert old_view(old_name, *keys) == (False, "7", "Exit code: 1", 1, True, True, False)
    timed_out = sandbox.run(slot, "terminal_stateful", command="echo so far; sleep 5", timeout=1)
    assert old_view(timed_out, "exit_code", "timeout", "stateful") == (
        False,
        "so far",
        "Command timed out after 1s; the stateful shell was restarted, its state is lost",
        -1,
        True,
        True,
    )


# --------------------------------------------------------------------------- files


def test_write_and_read_file_carry_path_and_size(sandbox: SandboxServer) -> None:
    slot = "slot_0"
    wrote = sandbox.run(slot, "write_file", path="old/notes.txt", content="héllo")
    assert old_view(wrote, "path", "size") == (
        True,
        "Successfully wrote 6 bytes to old/notes.txt",
        "",
        "old/notes.txt",
        6,
    )
    assert wrote["metadata"]["bytes"] == 6  # ours, kept

    read = sandbox.run(slot, "read_file", path="/workspace/old/notes.txt")
    assert old_view(read, "path", "size") == (True, "héllo", "", "old/notes.txt", 6)

    empty = sandbox.run(slot, "write_file", path="old/empty.txt")
    assert old_view(empty, "path", "size") == (
        True,
        "Successfully wrote 0 bytes to old/empty.txt",
        "",
        "old/empty.txt",
        0,
    )
    assert sandbox.sh(slot, "stat -c %s old/empty.txt")["output"] == "0"
    null = sandbox.run(slot, "write_file", path="old/null.txt", content=None)
    assert null["success"] and null["metadata"]["size"] == 0
    wrong = sandbox.run(slot, "write_file", path="old/x.txt", content=5)
    assert (wrong["success"], wrong["error"]) == (False, "'content' must be a string")


def test_reading_a_directory_is_a_clear_error(sandbox: SandboxServer) -> None:
    slot = "slot_0"
    assert sandbox.sh(slot, "mkdir -p adir/inner")["success"]
    for path, name in (("adir", "adir"), ("adir/inner/", "adir/inner"), (".", "/workspace")):
        for tool in ("read_file", "edit_file"):
            answer = sandbox.run(slot, tool, path=path, old_string="a", new_string="b")
            assert (answer["success"], answer["error"]) == (False, f"{name} is a directory")
        written = sandbox.run(slot, "write_file", path=path, content="x")
        assert (written["success"], written["error"]) == (False, f"{name} is a directory")


# --------------------------------------------------------------------------- settings


def test_network_isolated_and_output_bound_of_a_server_without_network(
    sandbox_factory: Factory,
) -> None:
    server = sandbox_factory(slots=1, args=["--no-network", "--max-output-bytes", "1000"])
    result = server.sh("slot_0", "echo hi")
    assert old_view(result, "exit_code", "sandboxed", "network_isolated") == (
        True,
        "hi",
        "",
        0,
        True,
        True,
    )
    # Both streams flooded: they share the bound, head and tail of each kept.
    flood = server.sh("slot_0", "seq 1 5000; seq 1 5000 >&2")
    meta = flood["metadata"]
    assert meta["truncated"] is True and meta["limit_hit"] == ["output"]
    size = len("".join(f"{i}\n" for i in range(1, 5001)))
    assert meta["stdout_bytes"] == meta["stderr_bytes"] == size
    assert meta["output_bytes"] == 2 * size
    out, err = flood["output"].split("\n[stderr]\n")
    for stream in (out.rstrip("\n"), err):
        assert stream.startswith("1\n2\n3\n") and stream.endswith("4999\n5000")
        assert f"[... {size - 500} bytes of output omitted ...]" in stream
    assert len(flood["output"]) <= 1000 + 150


def test_merged_setting_gives_the_raw_interleaved_form(sandbox_factory: Factory) -> None:
    # The variable the executor passes to every sandbox (TOOL_EXECUTOR_TERMINAL_OUTPUT).
    server = sandbox_factory(slots=1, env={"ATROPOS_SANDBOX_TERMINAL_OUTPUT": "merged"})
    both = server.sh("slot_0", "echo out; echo err >&2; echo more")
    assert old_view(both, "exit_code") == (True, "out\nerr\nmore\n", "", 0)
    assert "stderr_bytes" not in both["metadata"]
    failed = server.sh("slot_0", "echo x >&2; exit 3")
    assert old_view(failed, "exit_code") == (False, "x\n", "Exit code: 3", 3)
    stateful = server.run("slot_0", "terminal_stateful", command="echo a; echo b >&2")
    assert old_view(stateful, "stateful") == (True, "a\nb\n", "", True)
    code = "import sys\nprint(1, flush=True)\nprint(2, file=sys.stderr)"
    assert server.run("slot_0", "python", code=code)["output"] == "1\n2\n"
    timed_out = server.sh("slot_0", "echo partial; sleep 5", timeout=1)
    assert old_view(timed_out, "exit_code", "timeout") == (
        False,
        "partial\n",
        "Command timed out after 1s",
        -1,
        True,
    )


def test_unsandboxed_server_says_so(sandbox_factory: Factory) -> None:
    server = sandbox_factory(slots=1, args=["--isolation", "none"])
    result = server.sh("slot_0", "echo hi")
    assert old_view(result, "sandboxed", "network_isolated") == (True, "hi", "", False, False)


def test_terminal_output_flag_and_its_values() -> None:
    overrides, _ = parse_args(["--terminal-output", "merged"])
    assert overrides == {"terminal_output": "merged"}
    assert SandboxSettings(**overrides).terminal_output == "merged"
    assert SandboxSettings().terminal_output == "split"
    with pytest.raises(ValueError, match="terminal_output"):
        SandboxSettings(terminal_output="both")
