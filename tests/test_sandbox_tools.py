"""The tools a slot offers, through the real server."""

from __future__ import annotations

from harness.servers import SandboxServer


def test_terminal_runs_in_workspace_with_exit_codes(sandbox: SandboxServer) -> None:
    ok = sandbox.sh("slot_0", "pwd; echo out; echo err >&2")
    assert ok["success"] and ok["error"] == ""
    assert ok["output"] == "/workspace\nout\n\n[stderr]\nerr"
    assert ok["metadata"]["exit_code"] == 0
    failed = sandbox.sh("slot_0", "exit 3")
    assert not failed["success"]
    assert failed["metadata"]["exit_code"] == 3
    assert failed["error"] == "Exit code: 3"


def test_bash_alias_and_background_jobs(sandbox: SandboxServer) -> None:
    assert sandbox.run("slot_0", "bash", command="echo $BASH_VERSION")["output"].strip()
    # background: true starts a job (tests/test_sandbox_jobs.py) and answers with its id.
    started = sandbox.run("slot_0", "terminal", command="sleep 1", background=True)
    assert started["success"] is True, started
    assert started["metadata"]["task_id"] in started["output"]
    missing = sandbox.run("slot_0", "terminal")
    assert not missing["success"] and missing["error"] == "'command' must be a string"
    wrong = sandbox.run("slot_0", "terminal", command=["ls"])
    assert not wrong["success"] and wrong["error"] == "'command' must be a string"


def test_terminal_commands_do_not_share_shell_state(sandbox: SandboxServer) -> None:
    sandbox.sh("slot_1", "cd /tmp; export FLAVOUR=mint")
    result = sandbox.sh("slot_1", 'pwd; echo "[$FLAVOUR]"')
    assert result["output"] == "/workspace\n[]"


def test_stateful_terminal_keeps_directory_and_variables(sandbox: SandboxServer) -> None:
    slot = "slot_2"
    first = sandbox.run(slot, "terminal_stateful", command="mkdir -p deep/er && cd deep/er")
    assert first["success"]
    sandbox.run(slot, "terminal_stateful", command="export FLAVOUR=mint; greet() { echo hi $1; }")
    result = sandbox.run(slot, "terminal_stateful", command='pwd; echo "$FLAVOUR"; greet you')
    assert result["output"] == "/workspace/deep/er\nmint\nhi you"
    assert result["metadata"]["stateful"] is True

    broken = sandbox.run(slot, "terminal_stateful", command="if then")
    assert not broken["success"] and "syntax error" in broken["output"]
    assert broken["error"] == "Exit code: 2"
    assert sandbox.run(slot, "terminal_stateful", command="echo $FLAVOUR")["output"] == "mint"


def test_stateful_terminal_restarts_after_exit_and_timeout(sandbox: SandboxServer) -> None:
    slot = "slot_3"
    sandbox.run(slot, "terminal_stateful", command="export KEPT=1")
    exited = sandbox.run(slot, "terminal_stateful", command="exit 4")
    assert not exited["success"]
    assert exited["metadata"]["shell_exited"] is True
    assert exited["metadata"]["exit_code"] == 4
    assert exited["error"] == (
        "Exit code: 4; the stateful shell exited; the next call starts a new one"
    )
    fresh = sandbox.run(slot, "terminal_stateful", command='echo "[$KEPT]"')
    assert fresh["output"] == "[]"
    assert fresh["metadata"]["shell_restarted"] is True

    slow = sandbox.run(
        slot, "terminal_stateful", timeout=1, command="export X=1; echo before; sleep 30"
    )
    assert slow["output"] == "before"
    assert slow["metadata"]["timed_out"] is True
    assert slow["metadata"]["timeout"] is True
    assert slow["metadata"]["exit_code"] == -1
    assert slow["metadata"]["stateful"] is True
    assert slow["error"] == (
        "Command timed out after 1s; the stateful shell was restarted, its state is lost"
    )
    after = sandbox.run(slot, "terminal_stateful", command='echo "[$X]"')
    assert after["success"] and after["output"] == "[]"


def test_write_read_edit_file(sandbox: SandboxServer) -> None:
    slot = "slot_0"
    written = sandbox.run(slot, "write_file", path="src/app.py", content="x = 1\ny = 1\n")
    assert written["success"] and written["metadata"]["bytes"] == 12
    assert written["output"] == "Successfully wrote 12 bytes to src/app.py"
    assert (written["metadata"]["path"], written["metadata"]["size"]) == ("src/app.py", 12)
    assert (
        sandbox.run(slot, "read_file", path="/workspace/src/app.py")["output"] == "x = 1\ny = 1\n"
    )

    edited = sandbox.run(
        slot, "edit_file", path="src/app.py", old_string="x = 1", new_string="x = 2"
    )
    assert edited["success"]
    assert sandbox.sh(slot, "cat src/app.py")["output"] == "x = 2\ny = 1"

    ambiguous = sandbox.run(slot, "edit_file", path="src/app.py", old_string="= ", new_string="=")
    assert not ambiguous["success"] and "2 times" in ambiguous["error"]
    missing = sandbox.run(slot, "edit_file", path="src/app.py", old_str="z = 9", new_str="")
    assert not missing["success"] and "not found" in missing["error"]
    assert sandbox.sh(slot, "cat src/app.py")["output"] == "x = 2\ny = 1"

    nothing = sandbox.run(slot, "read_file", path="nope.txt")
    assert not nothing["success"] and "no such file" in nothing["error"]


def test_file_tools_refuse_escapes(sandbox: SandboxServer) -> None:
    slot = "slot_1"
    sandbox.sh(slot, "ln -sf /etc outward")
    for path in ("../x", "/etc/passwd", "outward/passwd", "a/../../x"):
        read = sandbox.run(slot, "read_file", path=path)
        assert not read["success"], path
        write = sandbox.run(slot, "write_file", path=path, content="x")
        assert not write["success"], path


def test_python_tool(sandbox: SandboxServer) -> None:
    result = sandbox.run("slot_2", "python", code="import sys\nprint(sum(range(10)), sys.argv)")
    assert result["success"] and result["output"] == "45 ['-']"
    failing = sandbox.run("slot_2", "python", code="raise SystemExit('boom')")
    assert not failing["success"] and failing["output"] == "boom"
    assert failing["error"] == "Exit code: 1"
    both = sandbox.run("slot_2", "python", code="import sys\nprint(1)\nprint(2, file=sys.stderr)")
    assert both["output"] == "1\n\n[stderr]\n2"
