"""The ``tmux`` tool through the real server: the session, its keys, screen and recording,
its isolation per slot, and its end on stop and reset.

The pure pieces (key names, the wait marker, send-keys groups) are checked first, without a
server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from atropos_agent.sandbox.agent.tmux_keys import (
    KEYS_GROUP_BYTES,
    is_key_name,
    send_commands,
    with_wait_marker,
)
from atropos_agent.sandbox.tools import SANDBOX_TOOL_SCHEMAS, SANDBOX_TOOLS
from harness.processes import host_processes_matching
from harness.servers import ExecutorServer, SandboxServer

Factory = Callable[..., SandboxServer]


def tmux(server: SandboxServer, slot: str, action: str, **args: Any) -> dict[str, Any]:
    return server.run(slot, "tmux", action=action, **args)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def stream_until_quiet(server: SandboxServer, slot: str, **args: Any) -> list[str]:
    """Cast lines streamed until a stream returns nothing new (the pane went quiet)."""
    lines: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = tmux(server, slot, "stream", **args)
        assert result["success"], result
        args = {}
        if not result["output"]:
            if lines:
                return lines
        else:
            assert result["output"].endswith("\n")  # whole lines only
            lines += result["output"].splitlines()
        time.sleep(0.2)
    raise AssertionError(f"the recording did not go quiet: {lines[-3:]}")


def tmux_listed(server: SandboxServer, slot: str) -> bool:
    """Whether ``tmux ls`` in the slot's terminal lists a session (or says there is none)."""
    listing = server.sh(slot, "tmux ls 2>&1")["output"]
    if "main:" in listing:
        return True
    assert "no server running" in listing or "error connecting" in listing, listing
    return False


def no_session(result: dict[str, Any]) -> bool:
    return not result["success"] and "no tmux session" in result["error"]


# --------------------------------------------------------------------------- pure pieces


def test_key_names_are_told_from_text() -> None:
    for key in ("Enter", "enter", "C-c", "M-x", "C-M-a", "^C", "Up", "F12", "KPEnter", "BSpace"):
        assert is_key_name(key), key
    for key in ("ls", "echo hi", "x", "C-", "Enterprise", "-la"):
        assert not is_key_name(key), key


def test_wait_marker_joins_the_command_line() -> None:
    marker = "tmux wait -S ch"
    assert with_wait_marker(["echo hi"], "ch") == ["echo hi", f"; {marker}", "Enter"]
    # A trailing Enter (or newline) is replaced by the marker's own.
    assert with_wait_marker(["make", "Enter"], "ch") == ["make", f"; {marker}", "Enter"]
    assert with_wait_marker(["make\n"], "ch") == ["make", f"; {marker}", "Enter"]
    # No ";" after a line that ends one already (";;" and "&;" are syntax errors).
    assert with_wait_marker(["sleep 9 &"], "ch") == ["sleep 9 &", f" {marker}", "Enter"]
    assert with_wait_marker(["true;"], "ch") == ["true;", f" {marker}", "Enter"]
    # Nothing typed, or a line cleared by a control key: the marker is a command of its own.
    assert with_wait_marker([], "ch") == [marker, "Enter"]
    assert with_wait_marker(["Enter"], "ch") == [marker, "Enter"]
    assert with_wait_marker(["C-c"], "ch") == ["C-c", marker, "Enter"]
    assert with_wait_marker(["Up"], "ch") == ["Up", f"; {marker}", "Enter"]


def test_long_keys_go_in_groups_below_tmux_command_limit() -> None:
    long_text = "x" * (3 * KEYS_GROUP_BYTES)
    commands = send_commands(["echo start", long_text, "Enter"], "main")
    assert commands[0][-1] == "echo start"
    literal = [c for c in commands if "-l" in c]
    assert "".join(c[-1] for c in literal) == long_text
    assert commands[-1][-1] == "Enter"
    assert all(len(" ".join(c).encode()) < 2 * KEYS_GROUP_BYTES for c in commands)


def test_tmux_schema_is_offered() -> None:
    assert "tmux" in SANDBOX_TOOLS
    (schema,) = [s for s in SANDBOX_TOOL_SCHEMAS if s["function"]["name"] == "tmux"]
    properties = schema["function"]["parameters"]["properties"]
    assert properties["action"]["enum"] == ["start", "send_keys", "capture", "stream", "stop"]
    for name in ("keys", "block", "max_wait_s", "min_wait_s", "capture_entire", "reset"):
        assert name in properties


# --------------------------------------------------------------------------- through the server


def test_start_send_capture_stream_stop(sandbox: SandboxServer) -> None:
    slot = "slot_0"
    started = tmux(sandbox, slot, "start")
    assert started["success"], started
    assert started["output"] == "started"
    meta = started["metadata"]
    assert meta["stateful"] is True
    assert (meta["pane_width"], meta["pane_height"], meta["session"]) == (200, 50, "main")

    again = tmux(sandbox, slot, "start", pane_width=80)
    assert again["success"] and again["output"] == "already running"
    assert again["metadata"]["pane_width"] == 200

    sent = tmux(sandbox, slot, "send_keys", keys="echo hi", block=True)
    assert sent["success"], sent
    assert sent["output"] == "ok"
    assert sent["metadata"]["stateful"] is True and sent["metadata"]["blocked"] is True

    screen = tmux(sandbox, slot, "capture")
    assert screen["success"], screen
    assert "\nhi\n" in screen["output"]
    assert screen["output"].splitlines()[-1].startswith("/workspace$")  # the prompt is back
    assert screen["metadata"] == {
        "stateful": True,
        "capture_entire": False,
        "truncated": False,
        "slot_id": slot,
    }

    lines = stream_until_quiet(sandbox, slot)
    header = json.loads(lines[0])
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (200, 50)
    assert isinstance(header["timestamp"], int)
    events = [json.loads(line) for line in lines[1:]]
    assert events and all(
        isinstance(t, float | int) and kind == "o" and isinstance(data, str)
        for t, kind, data in events
    )
    times = [event[0] for event in events]
    assert times == sorted(times)
    assert "hi\r\n" in "".join(event[2] for event in events)

    nothing = tmux(sandbox, slot, "stream")
    assert nothing["success"] and nothing["output"] == ""
    assert nothing["metadata"]["stream"] is True and nothing["metadata"]["stateful"] is True
    assert nothing["metadata"]["offset"] == sum(len(line) + 1 for line in lines)

    again_lines = stream_until_quiet(sandbox, slot, reset=True)
    assert again_lines[: len(lines)] == lines

    # max_bytes: whole lines only; a line longer than it comes alone.
    first = tmux(sandbox, slot, "stream", reset=True, max_bytes=10)
    assert first["output"] == lines[0] + "\n"
    assert first["metadata"]["more"] is True

    stopped = tmux(sandbox, slot, "stop")
    assert stopped["success"] and stopped["output"] == "stopped"
    after = tmux(sandbox, slot, "capture")
    assert no_session(after), after
    assert no_session(tmux(sandbox, slot, "send_keys", keys="echo hi"))
    assert not tmux_listed(sandbox, slot)
    # The next start is a fresh session: the last one's screen is gone.
    assert tmux(sandbox, slot, "start")["output"] == "started"
    assert "echo hi" not in tmux(sandbox, slot, "capture")["output"]
    assert tmux(sandbox, slot, "stop")["success"]


def test_wrong_keys_unknown_action_and_wait_timeout(sandbox: SandboxServer) -> None:
    slot = "slot_1"
    assert tmux(sandbox, slot, "start", pane_width=100, pane_height=30)["success"]
    for keys in (5, ["ls", 3], {"k": "v"}, None):
        result = tmux(sandbox, slot, "send_keys", keys=keys)
        assert not result["success"], keys
        assert "'keys' must be a string or a list of strings" in result["error"]
        assert result["metadata"]["stateful"] is True

    assert tmux(sandbox, slot, "send_keys", keys=["echo", "Space", "listed", "Enter"])["success"]
    wait_until(
        lambda: "\nlisted\n" in tmux(sandbox, slot, "capture")["output"], 5, "the list of keys"
    )
    unknown = tmux(sandbox, slot, "dance")
    assert unknown["success"], unknown
    assert "\nlisted\n" in unknown["output"]
    assert unknown["metadata"]["action"] == "capture"
    assert sandbox.run(slot, "tmux")["success"]  # no action at all: capture too

    slow = tmux(sandbox, slot, "send_keys", keys="sleep 30", block=True, max_wait_s=1)
    assert not slow["success"]
    assert slow["metadata"]["timed_out"] is True
    assert "still running" in slow["error"]
    assert tmux(sandbox, slot, "send_keys", keys="C-c")["success"]
    quick = tmux(sandbox, slot, "send_keys", keys=["echo after", "Enter"], block=True)
    assert quick["success"], quick
    assert "\nafter\n" in tmux(sandbox, slot, "capture")["output"]

    bad = tmux(sandbox, slot, "start", pane_width="wide")
    assert not bad["success"] and "pane_width" in bad["error"]
    assert tmux(sandbox, slot, "stop")["success"]


def test_session_survives_other_commands_timeouts_and_is_per_slot(
    sandbox: SandboxServer,
) -> None:
    slot, other = "slot_2", "slot_3"
    assert tmux(sandbox, slot, "start")["success"]
    assert tmux(sandbox, slot, "send_keys", keys="export KEPT=yes", block=True)["success"]
    # Commands of the slot's other tools, even ones killed for their timeout, leave it alone.
    assert sandbox.sh(slot, "sleep 30", timeout=1)["metadata"]["timed_out"] is True
    stateful = sandbox.run(slot, "terminal_stateful", command="sleep 30", timeout=1)
    assert stateful["metadata"]["timed_out"] is True
    assert "main:" in sandbox.sh(slot, "tmux ls")["output"]
    assert tmux(sandbox, slot, "send_keys", keys='echo "[$KEPT]"', block=True)["success"]
    assert "\n[yes]\n" in tmux(sandbox, slot, "capture")["output"]

    # The other slot sees no session, and no socket of this one.
    assert no_session(tmux(sandbox, other, "capture"))
    assert not tmux_listed(sandbox, other)
    assert tmux(sandbox, slot, "stop")["success"]


def test_session_ends_when_its_shell_exits(sandbox: SandboxServer) -> None:
    slot = "slot_3"
    assert tmux(sandbox, slot, "start")["success"]
    assert tmux(sandbox, slot, "send_keys", keys=["exit", "Enter"])["success"]
    wait_until(lambda: no_session(tmux(sandbox, slot, "capture")), 5, "the session to end")
    ended = tmux(sandbox, slot, "capture")
    assert "the last one ended" in ended["error"]
    # The server was reaped by the agent: no zombie is left.
    assert "tmux" not in sandbox.sh(slot, "ps -eo stat,comm | grep ^Z || true")["output"]
    # Its recording can still be streamed.
    assert tmux(sandbox, slot, "stream", reset=True)["output"].startswith('{"version": 2')
    assert tmux(sandbox, slot, "start")["output"] == "started"

    # A server left without the session (killed from the slot's terminal) is replaced.
    assert sandbox.sh(slot, "tmux new-session -d -s other && tmux kill-session -t main")["success"]
    lost = tmux(sandbox, slot, "capture")
    assert not lost["success"] and "main" in lost["error"]
    assert tmux(sandbox, slot, "start")["output"] == "started"
    assert "other" not in sandbox.sh(slot, "tmux ls")["output"]
    assert tmux(sandbox, slot, "stop")["success"]


def test_reset_ends_the_session(sandbox: SandboxServer) -> None:
    slot = "slot_1"
    assert tmux(sandbox, slot, "start")["success"]
    assert tmux(sandbox, slot, "send_keys", keys=["sleep 7611", "Enter"])["success"]
    wait_until(lambda: bool(host_processes_matching("sleep 7611")), 5, "sleep 7611 to run")
    assert sandbox.client.post("/reset", json={"slot_id": slot}).status_code == 200
    assert host_processes_matching("sleep 7611") == []
    assert no_session(tmux(sandbox, slot, "capture"))
    assert not tmux(sandbox, slot, "stream")["success"]  # the recording went with /tmp


def test_isolation_none_sessions_per_slot_reset_and_recording_cap(
    sandbox_factory: Factory,
) -> None:
    # Slot uids of their own: isolation "none" kills every process of its slots' uids on reset.
    uid_base = str(6_000_000 + (os.getpid() % 20_000) * 64)
    server = sandbox_factory(
        args=["--isolation", "none", "--slot-uid-base", uid_base, "--max-file-bytes", "4096"],
        slots=2,
    )
    assert tmux(server, "slot_0", "start")["success"]
    assert tmux(server, "slot_0", "send_keys", keys="echo none-mode", block=True)["success"]
    assert "\nnone-mode\n" in tmux(server, "slot_0", "capture")["output"]

    # slot_1 sees no session, and cannot reach slot_0's socket in slot_0's own /tmp.
    assert no_session(tmux(server, "slot_1", "capture"))
    slot_0_tmp = server.data_dir / "slots" / "slot_0" / "tmp"
    probe = server.sh("slot_1", f"TMUX_TMPDIR={slot_0_tmp} tmux ls 2>&1; tmux ls 2>&1")
    assert "main:" not in probe["output"], probe

    # The recording stops at its cap (max_file_bytes here), with a marker event saying so.
    assert tmux(server, "slot_0", "send_keys", keys="seq 1 3000", block=True)["success"]
    lines = stream_until_quiet(server, "slot_0", reset=True)
    assert sum(len(line) + 1 for line in lines) <= 4096 + 200
    last = json.loads(lines[-1])
    assert last[1] == "m" and "cap" in last[2]
    streamed = tmux(server, "slot_0", "stream", reset=True)
    assert streamed["metadata"]["recording_capped"] is True

    assert tmux(server, "slot_0", "send_keys", keys=["sleep 7612", "Enter"])["success"]
    wait_until(lambda: bool(host_processes_matching("sleep 7612")), 5, "sleep 7612 to run")
    assert server.client.post("/reset", json={"slot_id": "slot_0"}).status_code == 200
    assert host_processes_matching("sleep 7612") == []
    assert no_session(tmux(server, "slot_0", "capture"))


@pytest.mark.parametrize("keys", [["echo multi", "Enter"], "echo multi\n"])
def test_block_with_trailing_enter(sandbox: SandboxServer, keys: Any) -> None:
    slot = "slot_0"
    assert tmux(sandbox, slot, "start")["success"]
    sent = tmux(sandbox, slot, "send_keys", keys=keys, block=True)
    assert sent["success"], sent
    assert "\nmulti\n" in tmux(sandbox, slot, "capture")["output"]
    assert tmux(sandbox, slot, "stop")["success"]


def test_release_through_the_executor_ends_the_session(
    executor_factory: Callable[..., ExecutorServer],
) -> None:
    executor = executor_factory()
    trajectory = "tmux-release"
    started = executor.call(trajectory, "tmux", action="start")
    assert started["success"], started
    sent = executor.call(trajectory, "tmux", action="send_keys", keys=["sleep 7613", "Enter"])
    assert sent["success"], sent
    wait_until(lambda: bool(host_processes_matching("sleep 7613")), 5, "sleep 7613 to run")
    released = executor.client.post(
        "/release", json={"trajectory_id": trajectory, "reset_workspace": True}
    )
    assert released.status_code == 200, released.text
    assert host_processes_matching("sleep 7613") == []
    assert no_session(executor.call(trajectory, "tmux", action="capture"))
