"""The slot agent's pure pieces, without a server: frames, the path jail, output, results.

Plus starts of the shipped runtime directory under ``python -I -S``, the way a slot starts it
(without bubblewrap): to prove the package finds its own modules there, and to drive its
request loop frame by frame (a cancel mid-call, one that finds it idle, a frame out of turn).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atropos_agent.sandbox.agent import artifacts, framing
from atropos_agent.sandbox.agent.artifacts import bounded, mime_type, walk_files
from atropos_agent.sandbox.agent.config import AgentConfig
from atropos_agent.sandbox.agent.output import CommandOutput, OutputCapture
from atropos_agent.sandbox.agent.results import (
    CANCELLED,
    ToolError,
    command_result,
    failure,
    limits_seen,
)
from atropos_agent.sandbox.agent.shell import shell_quote
from atropos_agent.sandbox.agent.workspace import Workspace
from atropos_agent.sandbox.runtime import install_runtime
from atropos_agent.sandbox.settings import SandboxSettings
from harness.processes import host_processes_matching

MIB = 1024 * 1024


def config_for(root: Path, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "root": str(root),
        "scratch": [],
        "shell": "/bin/sh",
        "python": None,
        "max_output_bytes": 100,
        "max_file_bytes": 1000,
        "disk_bytes": 10 * MIB,
        "max_processes": 64,
        "memory_bytes": 1024 * MIB,
        "env": {"PATH": "/usr/bin:/bin", "HOME": str(root)},
    }
    raw.update(overrides)
    return raw


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "workspace"
    root.mkdir()
    return Workspace(os.path.realpath(root), [], disk_limit=1 * MIB)


# --------------------------------------------------------------------------- framing


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)


def test_frames_round_trip_through_a_pipe(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    messages: list[dict[str, Any]] = [
        {"op": framing.OP_TOOL, "args": {"text": "héllo\n" * 3}},
        {"ready": True},
    ]
    for message in messages:
        framing.write_frame(write_end, message)
    os.close(write_end)
    assert [framing.read_frame(read_end), framing.read_frame(read_end)] == messages
    assert framing.read_frame(read_end) is None  # the peer closed the pipe


def test_frame_is_a_big_endian_length_then_compact_json() -> None:
    frame = framing.encode_frame({"op": "shutdown"})
    assert frame == b'\x00\x00\x00\x11{"op":"shutdown"}'
    assert framing.body_length(frame[: framing.FRAME_HEADER.size]) == 17
    assert framing.decode_body(frame[framing.FRAME_HEADER.size :]) == {"op": "shutdown"}


def test_oversized_or_cut_frames_are_refused(pipe: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        framing.body_length(framing.FRAME_HEADER.pack(framing.MAX_FRAME_BYTES + 1))
    read_end, write_end = pipe
    os.write(write_end, framing.encode_frame({"op": "tool"})[:-3])
    os.close(write_end)
    assert framing.read_frame(read_end) is None  # cut short: the peer is gone


# --------------------------------------------------------------------------- the path jail


def test_resolve_maps_relative_and_workspace_paths(workspace: Workspace) -> None:
    root = workspace.root
    assert workspace.resolve("a/b.txt") == os.path.join(root, "a", "b.txt")
    assert workspace.resolve("/workspace/a/b.txt") == os.path.join(root, "a", "b.txt")
    assert workspace.resolve("/workspace") == root
    assert workspace.resolve("a/../b") == os.path.join(root, "b")
    assert workspace.relative(workspace.resolve("/workspace/x/y")) == "x/y"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside", "escapes the workspace"),
        ("a/../../outside", "escapes the workspace"),
        ("/etc/passwd", "outside /workspace"),
        ("/workspacex/file", "outside /workspace"),
        ("", "non-empty string"),
        (None, "non-empty string"),
        (7, "non-empty string"),
        ("nul\x00byte", "NUL"),
    ],
)
def test_resolve_refuses_escapes(workspace: Workspace, path: Any, reason: str) -> None:
    with pytest.raises(ToolError, match=reason):
        workspace.resolve(path)


def test_resolve_refuses_symlinks_that_lead_out(workspace: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = Path(workspace.root)
    (root / "out").symlink_to(outside)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "inner").symlink_to("sub")
    for path in ("out", "out/file", "passwd"):
        with pytest.raises(ToolError, match="through a symlink"):
            workspace.resolve(path)
    with pytest.raises(ToolError, match="through a symlink"):
        workspace.resolve("out/new/file", for_write=True)
    assert not (outside / "new").exists()  # refused before any directory was made out there
    # A symlink that stays inside is followed.
    assert workspace.resolve("inner/file") == str(root / "sub" / "file")


def test_resolve_for_write_creates_parents(workspace: Workspace) -> None:
    real = workspace.resolve("deep/er/file.txt", for_write=True)
    assert os.path.isdir(os.path.dirname(real))


def test_bounded_reads_and_disk_checked_writes(workspace: Workspace) -> None:
    real = workspace.resolve("data.bin", for_write=True)
    workspace.write_bytes(real, b"x" * 5000)
    assert workspace.read_bytes(real, 100) == (b"x" * 100, 5000, True)
    assert workspace.read_bytes(real, 5000) == (b"x" * 5000, 5000, False)
    with pytest.raises(ToolError, match="disk limit of 1 MiB"):
        workspace.write_bytes(workspace.resolve("big"), b"y" * (2 * MIB))
    os.mkfifo(os.path.join(workspace.root, "fifo"))
    with pytest.raises(ToolError, match="not a regular file"):  # and no hang on open
        workspace.read_bytes(workspace.resolve("fifo"), 10)
    with pytest.raises(ToolError, match="no such file: missing"):
        workspace.read_bytes(workspace.resolve("missing"), 10)
    assert workspace.disk_usage() >= 5000


# --------------------------------------------------------------------------- output and results


def test_output_capture_keeps_head_and_tail() -> None:
    capture = OutputCapture(10)
    for chunk in (b"01234", b"56789", b"abcdefghij" * 10, b"XYZ!?"):
        capture.feed(chunk)
    assert capture.truncated and capture.total == 115
    assert capture.text() == "01234\n[... 105 bytes of output omitted ...]\nXYZ!?"
    small = OutputCapture(10)
    small.feed(b"Hello")
    small.feed(b"World")
    assert not small.truncated and small.text() == "HelloWorld"
    assert small.lowered() == b"helloworld"


def test_command_result_reads_limits_from_how_a_command_ended(tmp_path: Path) -> None:
    config = AgentConfig(config_for(tmp_path, sandboxed=True, network_isolated=True))
    output = CommandOutput(100, split=True)
    output.stdout.feed(b"working\n")
    output.stderr.feed(b"Traceback...\nMemoryError\n")  # type: ignore[union-attr]
    seen = limits_seen(output, 1, 0, config)
    assert seen == ["memory"]  # found on stderr
    result = command_result(output, 1, seen, 0, 0.0, config)
    assert not result["success"]
    assert result["error"] == "Exit code: 1 (memory limit of 1024 MiB per command)"
    assert result["output"] == "working\n\n[stderr]\nTraceback...\nMemoryError"
    meta = result["metadata"]
    assert meta["limit_hit"] == ["memory"]
    assert (meta["exit_code"], meta["sandboxed"], meta["network_isolated"]) == (1, True, True)
    assert (meta["stdout_bytes"], meta["stderr_bytes"], meta["output_bytes"]) == (8, 25, 33)

    quiet = CommandOutput(100, split=False)
    assert limits_seen(quiet, 0, 0, config) == []  # markers only count when a command failed
    ok = command_result(quiet, 0, [], 0, 0.0, config)
    assert (ok["success"], ok["error"], ok["metadata"]["exit_code"]) == (True, "", 0)
    assert "stderr_bytes" not in ok["metadata"]  # merged: one stream
    killed = command_result(quiet, -9, [], 0, 0.0, config)
    assert killed["metadata"]["signal"] == 9 and killed["metadata"]["exit_code"] == 137
    assert killed["error"] == "Exit code: 137"
    timed_out = command_result(quiet, None, ["timeout"], 3, 0.0, config, timeout=2.5)
    assert timed_out["metadata"]["timed_out"] is True
    assert timed_out["metadata"]["timeout"] is True
    assert timed_out["metadata"]["exit_code"] == -1
    assert timed_out["metadata"]["killed_processes"] == 3
    assert timed_out["error"] == "Command timed out after 2.5s"
    whole = command_result(quiet, None, ["timeout"], 0, 0.0, config, timeout=30.0)
    assert whole["error"] == "Command timed out after 30s"
    disk = command_result(quiet, None, ["disk"], 0, 0.0, config)
    assert disk["error"].startswith("workspace disk limit of 10 MiB exceeded")
    assert disk["metadata"]["exit_code"] == -1


@pytest.mark.parametrize(
    ("stdout", "stderr", "expected"),
    [
        (b"out\n", b"err\n", "out\n\n[stderr]\nerr"),
        (b"hello\n", b"", "hello"),
        (b"", b"oops\n", "oops"),
        (b"", b"", ""),
        (b"  indented\n\n", b"", "indented"),
        (b"\n", b"err", "[stderr]\nerr"),  # stdout not empty: the header stays, stripped
    ],
)
def test_split_output_is_the_old_form(stdout: bytes, stderr: bytes, expected: str) -> None:
    output = CommandOutput(1000, split=True)
    output.stdout.feed(stdout)
    assert output.stderr is not None
    output.stderr.feed(stderr)
    assert output.text() == expected
    assert not output.truncated


def test_merged_output_is_raw() -> None:
    output = CommandOutput(1000, split=False)
    output.stdout.feed(b"out\nerr\n")
    assert output.stderr is None
    assert output.text() == "out\nerr\n"


def test_split_streams_share_the_output_bound() -> None:
    # Both large: each keeps half, head and tail.
    output = CommandOutput(20, split=True)
    assert output.stderr is not None
    output.stdout.feed(b"O" * 5 + b"o" * 90 + b"P" * 5)
    output.stderr.feed(b"E" * 5 + b"e" * 90 + b"F" * 5)
    assert output.truncated and output.budgets() == (10, 10)
    assert output.text() == (
        "OOOOO\n[... 90 bytes of output omitted ...]\nPPPPP\n[stderr]\n"
        "EEEEE\n[... 90 bytes of output omitted ...]\nFFFFF"
    )
    # A small stderr is kept whole; stdout gets the rest of the bound.
    small_err = CommandOutput(20, split=True)
    assert small_err.stderr is not None
    small_err.stdout.feed(b"0123456789" * 3)
    small_err.stderr.feed(b"boom")
    assert small_err.budgets() == (16, 4)
    assert small_err.text() == (
        "01234567\n[... 14 bytes of output omitted ...]\n23456789\n[stderr]\nboom"
    )
    # Under the bound together: nothing is cut.
    fits = CommandOutput(20, split=True)
    assert fits.stderr is not None
    fits.stdout.feed(b"a" * 10)
    fits.stderr.feed(b"b" * 10)
    assert not fits.truncated and fits.text() == "a" * 10 + "\n[stderr]\n" + "b" * 10


def test_output_capture_text_to_a_smaller_bound() -> None:
    capture = OutputCapture(100)
    capture.feed(bytes(range(65, 65 + 26)))  # A..Z, all held
    assert capture.text() == "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert capture.text(10) == "ABCDE\n[... 16 bytes of output omitted ...]\nVWXYZ"
    assert capture.text(1000) == capture.text()


def test_failure_is_the_one_failed_answer() -> None:
    assert failure("no", slot_lost=True) == {
        "success": False,
        "output": "",
        "error": "no",
        "metadata": {"slot_lost": True},
    }


def test_bounded_and_shell_quote() -> None:
    assert bounded(None, 50, "max_bytes") == 50
    assert bounded(500, 50, "max_bytes") == 50
    for bad in (-1, True, "3", 1.5):
        with pytest.raises(ToolError, match="'max_bytes' must be a non-negative integer"):
            bounded(bad, 50, "max_bytes")
    text = 'it\'s $HOME `x` "q"\n\\'
    echoed = subprocess.run(
        ["/bin/sh", "-c", f"printf %s {shell_quote(text)}"], capture_output=True, check=True
    )
    assert echoed.stdout.decode() == text


# --------------------------------------------------------------------------- the shipped runtime


def test_runtime_directory_runs_under_isolated_python(tmp_path: Path) -> None:
    """``python -I -S <runtime>``: the entry finds the package, answers a call, stops."""
    python = SandboxSettings().slot_python()
    runtime = tmp_path / "runtime"
    install_runtime(runtime, python)
    assert (runtime / "agent" / "__pycache__").is_dir()  # compiled once, for every slot
    root = tmp_path / "workspace"
    root.mkdir()
    agent = subprocess.Popen(
        [python, "-I", "-S", str(runtime), json.dumps(config_for(root))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
        env={},
    )
    assert agent.stdin is not None and agent.stdout is not None
    try:
        ready = framing.read_frame(agent.stdout.fileno())
        assert ready is not None and ready["ready"] is True
        request = {"op": framing.OP_TOOL, "tool": "terminal", "args": {"command": "echo hi"}}
        # One request at a time, as the server sends them (a frame out of turn is refused).
        answers = []
        for message in (request, {"op": "ping"}):
            agent.stdin.write(framing.encode_frame(message))
            agent.stdin.flush()
            answers.append(framing.read_frame(agent.stdout.fileno()))
        answer, unknown = answers
        assert answer is not None and answer["output"] == "hi" and answer["success"]
        assert unknown == failure("unknown agent operation 'ping'")
        agent.stdin.write(framing.encode_frame({"op": framing.OP_SHUTDOWN}))
        agent.stdin.flush()
        assert agent.wait(timeout=10) == 0
    finally:
        agent.kill()
        agent.wait()


# --------------------------------------------------------------------------- cancel


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The shipped runtime, started as a slot starts it (without bubblewrap), ready."""
    python = SandboxSettings().slot_python()
    runtime = tmp_path / "runtime"
    install_runtime(runtime, python)
    root = tmp_path / "workspace"
    root.mkdir()
    process = subprocess.Popen(
        [python, "-I", "-S", str(runtime), json.dumps(config_for(root))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env={},
    )
    try:
        ready = receive(process)
        assert ready is not None and ready["ready"] is True
        yield process
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def send(process: subprocess.Popen[bytes], *messages: dict[str, Any]) -> None:
    assert process.stdin is not None
    for message in messages:
        process.stdin.write(framing.encode_frame(message))
    process.stdin.flush()


def receive(process: subprocess.Popen[bytes], within_s: float = 10.0) -> dict[str, Any] | None:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], within_s)
    assert readable, f"no answer from the agent within {within_s}s"
    return framing.read_frame(process.stdout.fileno())


def tool(command: str, timeout: float = 60.0) -> dict[str, Any]:
    return {
        "op": framing.OP_TOOL,
        "tool": "terminal",
        "args": {"command": command},
        "timeout": timeout,
    }


def wait_until_running(command: str) -> None:
    deadline = time.monotonic() + 10
    while not host_processes_matching(command):
        assert time.monotonic() < deadline, f"{command} did not start"
        time.sleep(0.02)


def test_agent_cancel_kills_the_running_command_and_answers_for_it(
    agent: subprocess.Popen[bytes],
) -> None:
    sleep = f"sleep 30.{os.getpid()}1"
    send(agent, tool(f"echo started; {sleep}"))
    wait_until_running(sleep)
    started = time.monotonic()
    send(agent, {"op": framing.OP_CANCEL})
    answer = receive(agent, within_s=2)
    assert answer is not None and time.monotonic() - started < 1.5
    assert (answer["success"], answer["error"], answer["output"]) == (False, CANCELLED, "started")
    assert answer["metadata"]["cancelled"] is True and answer["metadata"]["exit_code"] == -1
    assert host_processes_matching(sleep) == []
    send(agent, tool("echo next"))
    after = receive(agent)
    assert after is not None and after["output"] == "next" and "cancelled" not in after["metadata"]


def test_agent_answers_nothing_to_a_cancel_that_finds_it_idle(
    agent: subprocess.Popen[bytes],
) -> None:
    # As when a cancel crosses the answer of the call it meant: the next answer is the next
    # request's, so the stream stays in step.
    send(agent, tool("echo first"))
    answers = [receive(agent)]
    send(agent, {"op": framing.OP_CANCEL}, tool("echo second"))
    answers.append(receive(agent))
    assert [a and a["output"] for a in answers] == ["first", "second"]
    assert all(a and a["success"] and "cancelled" not in a["metadata"] for a in answers)


def test_agent_stops_on_any_other_frame_while_a_call_runs(
    agent: subprocess.Popen[bytes],
) -> None:
    sleep = f"sleep 30.{os.getpid()}2"
    send(agent, tool(sleep))
    wait_until_running(sleep)
    send(agent, tool("echo crossed"))
    assert agent.wait(timeout=10) != 0  # a broken stream: the server loses the slot
    assert agent.stderr is not None
    assert b"unexpected frame while a call ran: op 'tool'" in agent.stderr.read()
    assert host_processes_matching(sleep) == []


def test_agent_stops_at_once_on_a_shutdown_while_a_call_runs(
    agent: subprocess.Popen[bytes],
) -> None:
    # The server stops its slots without waiting for their calls.
    sleep = f"sleep 30.{os.getpid()}3"
    send(agent, tool(sleep))
    wait_until_running(sleep)
    send(agent, {"op": framing.OP_SHUTDOWN})
    assert agent.wait(timeout=10) == 0
    assert host_processes_matching(sleep) == []


# --------------------------------------------------------------------------- artifacts


def test_mime_type_is_the_old_suffix_table() -> None:
    assert mime_type("/w/report.tar.gz") == "application/gzip"
    assert mime_type("/w/x.TGZ") == "application/gzip"
    assert mime_type("/w/x.gz") == "application/octet-stream"
    assert mime_type("/w/x.jpeg") == "image/jpeg"
    assert mime_type("/w/.md") == "application/octet-stream"  # a dot file has no suffix
    assert mime_type("/w/Makefile") == "application/octet-stream"


def test_walk_files_is_sorted_by_path_and_never_follows_links(workspace: Workspace) -> None:
    root = Path(workspace.root)
    for name in ("b.txt", "a/z.txt", "a/sub/y.txt", "a.txt", "ab/x.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "link").symlink_to("/etc")
    os.mkfifo(root / "fifo")
    found = [os.path.relpath(path, root) for path in walk_files(str(root))]
    assert found == ["a/sub/y.txt", "a/z.txt", "a.txt", "ab/x.txt", "b.txt", "link"]


def test_archive_over_max_bytes_is_measured_up_to_a_ceiling(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(workspace.root)
    for number in range(5):
        (root / f"f{number}.bin").write_bytes(os.urandom(200_000))  # incompressible
    full = artifacts.archive(workspace, 4 << 20, {"path": "."})
    assert full["success"] and full["entry_count"] == 5 and full["bytes"] > 1_000_000
    over = artifacts.archive(workspace, 4 << 20, {"path": ".", "max_bytes": 1000})
    assert (over["success"], over["bytes"], over["entry_count"]) == (False, full["bytes"], 5)
    assert over["error"].startswith(f"archive of {full['bytes']} bytes exceeds max_bytes=1000")
    # Past the ceiling the measuring stops (at the next file), and says the size is a bound.
    monkeypatch.setattr(artifacts, "ARCHIVE_MEASURE_CEILING", 300_000)
    capped = artifacts.archive(workspace, 4 << 20, {"path": ".", "max_bytes": 1000})
    assert capped["success"] is False
    assert 1 <= capped["entry_count"] < 5 and 300_000 < capped["bytes"] < full["bytes"]
    assert capped["error"].startswith(f"archive of more than {capped['bytes']} bytes exceeds")


def test_open_file_refuses_a_directory_with_a_clear_error(workspace: Workspace) -> None:
    os.mkdir(os.path.join(workspace.root, "d"))
    with pytest.raises(ToolError, match=r"^d is a directory$"):
        workspace.open_file(workspace.resolve("d"))
    with pytest.raises(ToolError, match=r"^/workspace is a directory$"):
        workspace.read_bytes(workspace.resolve("."), 10)
