"""Every per-command and per-slot limit of the sandbox, proved against the real server.

Each test starts ``python -m atropos_agent.sandbox`` under real bubblewrap with small limits
and checks both that the limit holds (the command is stopped, the host is clean, other slots
are unaffected) and that the result says so in ``metadata`` (``limit_hit``, ``timed_out``,
``truncated``).

The servers get their own ``--slot-uid-base``: the process limit is per host uid, and other
test modules may run sandbox servers with the default base at the same time.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from harness.processes import host_processes_matching
from harness.servers import SandboxServer

# How the slot agent shows in a process list: its runtime directory run as a program.
AGENT_ARGS = "-I -S /run/atropos "
MAX_OUTPUT = 2000
MAX_FILE = 65536
DISK_MB = 20
MAX_PROCESSES = 40
LIMIT_ARGS = [
    "--memory-mb",
    "256",
    "--max-processes",
    str(MAX_PROCESSES),
    "--max-output-bytes",
    str(MAX_OUTPUT),
    "--max-file-bytes",
    str(MAX_FILE),
    "--disk-mb",
    str(DISK_MB),
]
# Distinct host uids per server of this run (and, by pid, per concurrent run).
UID_BASES = itertools.count(300_000 + (os.getpid() % 1000) * 1000, 10)

Factory = Callable[..., SandboxServer]


def start(factory: Factory, slots: int = 1) -> tuple[SandboxServer, int]:
    """A server with the small limits; returns it and the host uid of its slot_0."""
    uid_base = next(UID_BASES)
    server = factory(slots=slots, args=[*LIMIT_ARGS, "--slot-uid-base", str(uid_base)])
    return server, uid_base


def timed(call: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    result = call()
    return result, time.monotonic() - began


def limits(result: dict[str, Any]) -> list[str]:
    hit: list[str] = result["metadata"].get("limit_hit", [])
    return hit


def uid_processes(uid: int) -> list[str]:
    """Command lines of live (not zombie) host processes whose real uid is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        match = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
        zombie = re.search(r"^State:\s+Z", status, re.MULTILINE)
        if match and int(match.group(1)) == uid and not zombie:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def slot_infrastructure(cmdline: str) -> bool:
    """The processes a slot always has: bubblewrap (outer and pid-1) and the agent."""
    return cmdline.startswith("/usr/bin/bwrap ") or AGENT_ARGS in cmdline


def eventually(predicate: Callable[[], bool], within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------- 1. timeout


def test_wall_clock_timeout(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    result, elapsed = timed(lambda: server.sh("slot_0", "sleep 30", timeout=1))
    assert elapsed < 5, elapsed
    assert result["success"] is False
    meta = result["metadata"]
    assert meta["timed_out"] is True
    assert "timeout" in limits(result)
    assert meta["timeout"] is True
    assert meta["exit_code"] == -1  # killed, not finished (the old service's value)
    assert meta["killed_processes"] >= 1
    assert result["error"] == "Command timed out after 1s"
    # A fast command in the same slot is unaffected by the earlier timeout.
    again = server.sh("slot_0", "echo fine", timeout=5)
    assert again["success"] is True and again["output"] == "fine"
    assert "limit_hit" not in again["metadata"]


# --------------------------------------------------------------------------- 2. descendants


def test_timeout_kills_every_descendant(sandbox_factory: Factory) -> None:
    server, uid_base = start(sandbox_factory)
    command = "sleep 7301 & (setsid sleep 7302 &); nohup sleep 7303 >/dev/null 2>&1 & sleep 60"
    # The daemons really start before the timeout: the shell forks them first.
    result, elapsed = timed(lambda: server.sh("slot_0", command, timeout=1))
    assert elapsed < 5, elapsed
    assert result["metadata"]["timed_out"] is True
    assert "timeout" in limits(result)
    # The shell, the four sleeps (and the subshell if it still existed) were all killed.
    assert result["metadata"]["killed_processes"] >= 4

    assert eventually(lambda: not host_processes_matching("sleep 730")), host_processes_matching(
        "sleep 730"
    )
    assert all(slot_infrastructure(line) for line in uid_processes(uid_base)), uid_processes(
        uid_base
    )
    inside = server.sh("slot_0", "ps -eo args", timeout=5)
    assert inside["success"] is True
    assert AGENT_ARGS in inside["output"]  # ps really lists the slot's processes
    assert "sleep 730" not in inside["output"]


def test_timeout_in_stateful_shell_kills_every_descendant(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    command = "sleep 7311 & (setsid sleep 7312 &); nohup sleep 7313 >/dev/null 2>&1 & sleep 60"
    result, elapsed = timed(
        lambda: server.run("slot_0", "terminal_stateful", timeout=1, command=command)
    )
    assert elapsed < 5, elapsed
    assert result["metadata"]["timed_out"] is True
    assert "timeout" in limits(result)
    assert eventually(lambda: not host_processes_matching("sleep 731")), host_processes_matching(
        "sleep 731"
    )
    after = server.run("slot_0", "terminal_stateful", timeout=5, command="ps -eo args")
    assert after["success"] is True
    assert after["metadata"]["shell_restarted"] is True
    assert "sleep 731" not in after["output"]


def test_background_process_of_a_finished_command_keeps_running(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    started, elapsed = timed(
        lambda: server.sh("slot_0", "sleep 7401 >/dev/null 2>&1 &", timeout=10)
    )
    # The call returns at once although its background child lives on.
    assert elapsed < 3, elapsed
    assert started["success"] is True
    assert "limit_hit" not in started["metadata"]

    later = server.sh("slot_0", "ps -eo args", timeout=5)
    assert "sleep 7401" in later["output"]
    assert host_processes_matching("sleep 7401")

    # A later command that times out kills only what *it* started, not the earlier daemon.
    timed_out = server.sh("slot_0", "sleep 7402 & sleep 30", timeout=1)
    assert "timeout" in limits(timed_out)
    still = server.sh("slot_0", "ps -eo args", timeout=5)
    assert "sleep 7401" in still["output"]
    assert "sleep 7402" not in still["output"]
    # Such a process lives until the slot is reset: POST /reset stops every process of the
    # slot (tested with reset itself, not here); stopping this server kills it too.


# --------------------------------------------------------------------------- 3. memory


def test_memory_limit_per_command(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    hog = "data = bytearray(1 << 30)\nfor i in range(0, len(data), 4096):\n    data[i] = 1\n"
    result = server.run("slot_0", "python", timeout=20, code=hog)
    assert result["success"] is False
    assert "memory" in limits(result)
    assert "MemoryError" in result["output"]
    assert result["error"] == "Exit code: 1 (memory limit of 256 MiB per command)"

    via_shell = server.sh("slot_0", "python3 -c 'x = b\"x\" * (1 << 30)'", timeout=20)
    assert via_shell["success"] is False
    assert "memory" in limits(via_shell)

    small = "data = bytearray(32 << 20)\ndata[-1] = 7\nprint(len(data), data[-1])\n"
    fine = server.run("slot_0", "python", timeout=20, code=small)
    assert fine["success"] is True, fine
    assert fine["output"] == f"{32 << 20} 7"
    assert "limit_hit" not in fine["metadata"]


# --------------------------------------------------------------------------- 4. processes


def test_fork_bomb_is_contained(sandbox_factory: Factory) -> None:
    server, uid_base = start(sandbox_factory, slots=2)
    bomb_uid = uid_base  # slot_0
    headers = {"Authorization": f"Bearer {server.token}"}
    outcome: dict[str, Any] = {}

    def run_bomb() -> None:
        item = {
            "slot_id": "slot_0",
            "tool": "terminal",
            "timeout": 3,
            "args": {"command": "bomb(){ bomb | bomb & }; bomb; sleep 5"},
        }
        began = time.monotonic()
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            response = client.post("/execute", json=item)
        outcome["elapsed"] = time.monotonic() - began
        outcome["status"] = response.status_code
        outcome["result"] = response.json()

    bomber = threading.Thread(target=run_bomb)
    bomber.start()
    try:
        # Watch the slot's process count while the bomb reaches the process limit.
        peak = 0
        watch_until = time.monotonic() + 1.0
        while time.monotonic() < watch_until:
            peak = max(peak, len(uid_processes(bomb_uid)))
        other, other_elapsed = timed(lambda: server.sh("slot_1", "echo other", timeout=5))
        began = time.monotonic()
        health = httpx.get(server.url + "/health", timeout=5)
        health_elapsed = time.monotonic() - began
        peak = max(peak, len(uid_processes(bomb_uid)))
        bomb_still_running = bomber.is_alive()
    finally:
        bomber.join(timeout=30)
    assert not bomber.is_alive()

    # While the bomb ran, the other slot and the server answered promptly.
    assert bomb_still_running, "the bomb ended before the other calls were made"
    assert other["success"] is True and other["output"] == "other"
    assert other_elapsed < 3, other_elapsed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health_elapsed < 3, health_elapsed
    # The bomb really ran into the process limit: the slot's uid never had many more.
    assert MAX_PROCESSES - 10 <= peak <= MAX_PROCESSES + 5, peak

    assert outcome["status"] == 200
    bomb = outcome["result"]
    assert bomb["success"] is False
    assert {"processes", "timeout"} & set(limits(bomb)), bomb["metadata"]
    assert outcome["elapsed"] < 10, outcome["elapsed"]
    assert len(bomb["output"]) <= MAX_OUTPUT + 100

    # Afterwards the slot works and nothing of the bomb is left on the host.
    after = server.sh("slot_0", "echo ok", timeout=5)
    assert after["success"] is True and after["output"] == "ok"
    assert eventually(lambda: all(slot_infrastructure(line) for line in uid_processes(bomb_uid))), (
        uid_processes(bomb_uid)
    )
    assert len(uid_processes(bomb_uid)) <= 3
    assert not any("bomb" in line for line in uid_processes(bomb_uid))


def test_exited_daemons_do_not_use_up_the_process_limit(sandbox_factory: Factory) -> None:
    """Orphans are re-parented to the agent; once they exit they must not keep counting.

    Each ``(true &)`` leaves an orphan that exits at once. 200 of them in one command, with a
    limit of 40 processes, only work if the agent reaps them while the command still runs.
    """
    server, _ = start(sandbox_factory)
    result = server.sh("slot_0", "for i in $(seq 200); do (true &); done; echo done", timeout=10)
    # Without reaping, fork fails for good after ~40 orphans and the loop never ends. (Under
    # heavy load a fork may still need one retry, hence only the end of the output is checked.)
    assert result["success"] is True, result
    assert result["output"].endswith("done")
    assert "limit_hit" not in result["metadata"]


def test_process_limit_is_reported(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    result = server.sh("slot_0", "for i in $(seq 100); do sleep 5 & done; wait", timeout=10)
    assert result["success"] is False
    assert "processes" in limits(result)
    assert f"process limit of {MAX_PROCESSES}" in result["error"]
    assert "fork" in result["output"]
    # The slot recovers once those processes are gone.
    assert server.sh("slot_0", "echo ok", timeout=5)["output"] == "ok"


# --------------------------------------------------------------------------- 5. output


def test_output_keeps_head_and_tail(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    expected = "".join(f"{i}\n" for i in range(1, 200_001))
    result = server.sh("slot_0", "seq 1 200000", timeout=20)
    assert result["success"] is True  # the command itself succeeded
    meta = result["metadata"]
    assert meta["truncated"] is True
    assert "output" in limits(result)
    assert meta["output_bytes"] == len(expected)
    output = result["output"]
    assert output.startswith("1\n2\n3\n")
    assert output.endswith("200000")  # stripped, as the old service's output
    assert output.startswith(expected[: MAX_OUTPUT // 2])
    assert output.endswith(expected[-MAX_OUTPUT // 2 :].rstrip())
    omitted = len(expected) - MAX_OUTPUT
    assert f"[... {omitted} bytes of output omitted ...]" in output
    assert MAX_OUTPUT - 1 <= len(output) <= MAX_OUTPUT + 100, len(output)


def test_output_flood_times_out_with_bounded_output(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    result, elapsed = timed(lambda: server.sh("slot_0", "yes", timeout=2))
    assert elapsed < 6, elapsed
    assert result["metadata"]["timed_out"] is True
    assert {"timeout", "output"} <= set(limits(result))
    assert result["metadata"]["truncated"] is True
    assert result["metadata"]["output_bytes"] > 10 * MAX_OUTPUT
    assert len(result["output"]) <= MAX_OUTPUT + 100
    assert result["output"].startswith("y\ny\n") and result["output"].endswith("\ny")
    assert "omitted" in result["output"]
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.sh("slot_0", "echo ok", timeout=5)["output"] == "ok"


# --------------------------------------------------------------------------- 6. file size


def test_file_size_caps(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    too_big = server.run("slot_0", "write_file", path="big.txt", content="a" * (MAX_FILE + 1))
    assert too_big["success"] is False
    assert f"{MAX_FILE + 1} bytes" in too_big["error"]
    assert f"{MAX_FILE}-byte file write limit" in too_big["error"]
    assert "No such file" in server.sh("slot_0", "ls big.txt", timeout=5)["output"]

    at_cap = server.run("slot_0", "write_file", path="cap.txt", content="b" * MAX_FILE)
    assert at_cap["success"] is True, at_cap
    assert server.sh("slot_0", "wc -c < cap.txt", timeout=5)["output"].strip() == str(MAX_FILE)

    made = server.sh("slot_0", "head -c 200000 /dev/zero | tr '\\0' a > big", timeout=10)
    assert made["success"] is True, made
    read = server.run("slot_0", "read_file", path="big")
    assert read["success"] is True
    meta = read["metadata"]
    assert meta["truncated"] is True
    assert meta["file_size"] == 200_000
    assert meta["bytes"] == MAX_FILE
    assert read["output"] == "a" * MAX_FILE

    small = server.run("slot_0", "read_file", path="cap.txt")
    assert small["metadata"]["truncated"] is False
    assert len(small["output"]) == MAX_FILE


# --------------------------------------------------------------------------- 7. disk


def test_disk_bound_single_big_file(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    result = server.sh("slot_0", "head -c 40M /dev/zero > big", timeout=20)
    assert result["success"] is False
    assert "disk" in limits(result)
    assert f"disk limit of {DISK_MB} MiB" in result["error"]
    size = int(server.sh("slot_0", "stat -c %s big", timeout=5)["output"])
    assert size <= DISK_MB * 1024 * 1024
    assert server.sh("slot_0", "rm big", timeout=5)["success"] is True

    # /tmp is part of the same bound.
    in_tmp = server.sh("slot_0", "head -c 40M /dev/zero > /tmp/big", timeout=20)
    assert in_tmp["success"] is False
    assert "disk" in limits(in_tmp)


def test_disk_bound_many_files_and_recovery(sandbox_factory: Factory) -> None:
    server, _ = start(sandbox_factory)
    fast = server.sh(
        "slot_0", "for i in $(seq 30); do head -c 1M /dev/zero > f$i; done", timeout=20
    )
    assert fast["success"] is False
    assert "disk" in limits(fast)
    assert server.sh("slot_0", "rm -f f*", timeout=5)["success"] is True

    slow_writer = "for i in $(seq 200); do head -c 1M /dev/zero > g$i; sleep 0.05; done"
    slow, elapsed = timed(lambda: server.sh("slot_0", slow_writer, timeout=60))
    # Writing all 200 files takes at least 10 s; the writer is stopped soon after 20 MiB.
    assert elapsed < 5, elapsed
    assert slow["success"] is False
    assert "disk" in limits(slow)
    assert "timeout" not in limits(slow)
    assert slow["metadata"]["exit_code"] == -1  # killed, not finished
    assert slow["metadata"]["killed_processes"] >= 1
    written = int(server.sh("slot_0", "ls | grep -c '^g'", timeout=5)["output"])
    assert DISK_MB <= written < 60, written

    # While over the bound, write_file is refused and says why.
    refused = server.run("slot_0", "write_file", path="note.txt", content="hello")
    assert refused["success"] is False
    assert f"disk limit of {DISK_MB} MiB" in refused["error"]
    over = server.sh("slot_0", "echo still over", timeout=5)
    assert "disk" in limits(over)

    # After deleting the files, writes work again.
    assert server.sh("slot_0", "rm -f g*", timeout=5)["success"] is True
    accepted = server.run("slot_0", "write_file", path="note.txt", content="hello")
    assert accepted["success"] is True, accepted
    fine = server.sh("slot_0", "head -c 5M /dev/zero > ok.bin && cat note.txt", timeout=10)
    assert fine["success"] is True, fine
    assert fine["output"] == "hello"
    assert "limit_hit" not in fine["metadata"]
