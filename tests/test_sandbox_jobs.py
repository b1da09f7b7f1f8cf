"""Background jobs through the real server (and once through the real executor): a job runs on
after its call answered, is polled by byte offset, killed whole, held to its own timeout, kept
within its slot, and ended by a reset; a foreground command's timeout leaves it alone."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from atropos_agent.sandbox.agent.job_output import JobOutput
from atropos_agent.sandbox.agent.jobs import BUFFER_BYTES, MAX_KEPT, MAX_RUNNING
from harness.processes import host_processes_matching, unique_sleep
from harness.servers import ExecutorServer, SandboxServer, start_sandbox
from tests.executor_support import wait_for

LONG_S = 60.0


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    """Slots with the default output bound (64 KiB per answer) and a 10 s job timeout."""
    server = start_sandbox(slots=4, args=["--job-timeout", "10"])
    yield server
    server.stop()


def call(sandbox: SandboxServer, slot: str, tool: str, **args: Any) -> dict[str, Any]:
    """One call through ``POST /execute``, every argument (``timeout`` too) in ``args``."""
    response = sandbox.client.post("/execute", json={"slot_id": slot, "tool": tool, "args": args})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def start_job(sandbox: SandboxServer, slot: str, command: str, **args: Any) -> str:
    started = call(sandbox, slot, "background_run", command=command, **args)
    assert started["success"] is True, started
    task_id: str = started["metadata"]["task_id"]
    assert task_id in started["output"]
    return task_id


def check(sandbox: SandboxServer, slot: str, task_id: str, since: int = 0) -> dict[str, Any]:
    result = call(sandbox, slot, "check_background", task_id=task_id, since=since)
    assert result["success"] is True, result
    metadata: dict[str, Any] = result["metadata"]
    return {"output": result["output"], **metadata}


def until_ended(sandbox: SandboxServer, slot: str, task_id: str, timeout_s: float) -> str:
    """Poll the job from offset 0 on until it ended; returns everything it printed."""
    printed: str = ""
    since = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = check(sandbox, slot, task_id, since)
        printed += str(state["output"])
        since = state["next"]
        if state["status"] != "running" and not state["more"]:
            return printed
        time.sleep(0.05)
    raise AssertionError(f"job {task_id} still running after {timeout_s}s")


def reset(sandbox: SandboxServer, slot: str) -> None:
    response = sandbox.client.post("/reset", json={"slot_id": slot})
    assert response.status_code == 200, response.text


def test_a_job_answers_at_once_and_is_polled_until_it_exits(sandbox: SandboxServer) -> None:
    began = time.monotonic()
    task_id = start_job(sandbox, "slot_0", "sleep 2; echo done; exit 3")
    assert time.monotonic() - began < 1.5
    running = check(sandbox, "slot_0", task_id)
    assert running["status"] == "running" and "exit_code" not in running
    assert running["output"] == "" and running["next"] == 0

    assert until_ended(sandbox, "slot_0", task_id, 10) == "done\n"
    ended = check(sandbox, "slot_0", task_id)
    assert ended["status"] == "exited" and ended["exit_code"] == 3, ended
    assert 2 <= ended["runtime_s"] < 5

    # ``terminal`` with ``background: true`` starts a job the same way.
    started = call(sandbox, "slot_0", "terminal", command="echo from terminal", background=True)
    assert started["success"] is True
    other = started["metadata"]["task_id"]
    assert other in started["output"] and other != task_id
    assert until_ended(sandbox, "slot_0", other, 10) == "from terminal\n"

    listed = call(sandbox, "slot_0", "check_background")
    jobs = {job["task_id"]: job for job in listed["metadata"]["jobs"]}
    assert jobs[task_id]["command"] == "sleep 2; echo done; exit 3"
    assert jobs[task_id]["status"] == "exited" and jobs[other]["status"] == "exited"
    assert task_id in listed["output"] and other in listed["output"]


def test_polling_from_next_returns_each_byte_once(sandbox: SandboxServer) -> None:
    command = "for i in $(seq 1 40); do echo line $i; echo err $i >&2; sleep 0.05; done"
    task_id = start_job(sandbox, "slot_1", command)
    chunks = []
    since = 0
    while True:
        state = check(sandbox, "slot_1", task_id, since)
        assert state["since"] == since and state["dropped_bytes"] == 0
        assert state["next"] == since + len(state["output"].encode())
        chunks.append(state["output"])
        since = state["next"]
        if state["status"] != "running" and not state["more"]:
            break
        time.sleep(0.1)
    expected = "".join(f"line {i}\nerr {i}\n" for i in range(1, 41))
    assert "".join(chunks) == expected
    assert sum(1 for chunk in chunks if chunk) >= 5, "polls should see the output grow"
    assert state["exit_code"] == 0 and state["output_bytes"] == len(expected)
    # An offset may be asked again; beyond the output it is refused.
    assert check(sandbox, "slot_1", task_id, 5)["output"] == expected[5:]
    beyond = call(sandbox, "slot_1", "check_background", task_id=task_id, since=10**6)
    assert beyond["success"] is False and "beyond the job's output" in beyond["error"]


def test_kill_ends_the_job_and_everything_it_started(sandbox: SandboxServer) -> None:
    child, parent = unique_sleep(), unique_sleep()
    # Through variables: the job's shell must not match the sleeps' own command lines.
    script = f"a={child.split()[1]} b={parent.split()[1]}; (sleep $a &); sleep $b & wait"
    task_id = start_job(sandbox, "slot_2", script)
    wait_for(
        lambda: bool(host_processes_matching(child) and host_processes_matching(parent)),
        5,
        "the job",
    )
    killed = call(sandbox, "slot_2", "background_kill", task_id=task_id)
    assert killed["success"] is True, killed
    assert killed["metadata"]["status"] == "killed" and killed["metadata"]["was_running"]
    assert killed["metadata"]["killed_processes"] >= 3  # the shell and both sleeps
    # The detached child left the job's process tree, not its session: it is gone too.
    assert host_processes_matching(child) == [] and host_processes_matching(parent) == []
    assert check(sandbox, "slot_2", task_id)["status"] == "killed"
    again = call(sandbox, "slot_2", "background_kill", task_id=task_id)
    assert again["success"] and again["metadata"]["was_running"] is False


def test_a_job_outliving_its_timeout_is_killed_without_any_request(
    sandbox: SandboxServer,
) -> None:
    sleep = unique_sleep()
    task_id = start_job(sandbox, "slot_3", f"echo before; {sleep}", timeout=1)
    wait_for(lambda: bool(host_processes_matching(sleep)), 5, sleep)
    # No request reaches the slot meanwhile: the idle agent fires the timeout itself.
    wait_for(lambda: not host_processes_matching(sleep), 4, "the timeout's kill")
    state = check(sandbox, "slot_3", task_id)
    assert state["status"] == "timed_out" and "exit_code" not in state, state
    assert state["output"] == "before\n" and state["timeout_s"] == 1.0
    # Longer than the sandbox allows (--job-timeout 10): held to that.
    capped = call(sandbox, "slot_3", "background_run", command="true", timeout=10**400)
    assert capped["metadata"]["timeout_s"] == 10.0


def test_a_foreground_timeout_or_cancel_leaves_running_jobs_alive(
    sandbox: SandboxServer,
) -> None:
    sleep = unique_sleep()
    # Back to back in one batch: the job most likely starts in the same clock tick as the
    # command, where start times cannot tell the job from the command's own orphans.
    items: list[dict[str, Any]] = [
        {"slot_id": "slot_0", "tool": "background_run", "args": {"command": sleep}},
        {"slot_id": "slot_0", "tool": "terminal", "args": {"command": "sleep 20 & sleep 20"}},
    ]
    items[1]["timeout"] = 1
    started, timed_out = sandbox.client.post("/batch", json=items).json()
    task_id = started["metadata"]["task_id"]
    assert timed_out["metadata"].get("timed_out") is True, timed_out
    assert host_processes_matching(sleep), "the foreground timeout killed a background job"

    with ThreadPoolExecutor(1) as pool:
        foreground = pool.submit(sandbox.sh, "slot_0", "sleep 20", LONG_S)
        wait_for(lambda: sandbox.client.get("/slots").json()["slots"][0]["busy"], 5, "busy")
        time.sleep(0.2)
        assert sandbox.client.post("/cancel", json={"slot_id": "slot_0"}).json()["cancelled"]
        assert foreground.result(timeout=5)["metadata"]["cancelled"] is True
    assert host_processes_matching(sleep), "the cancel killed a background job"
    assert check(sandbox, "slot_0", task_id)["status"] == "running"
    call(sandbox, "slot_0", "background_kill", task_id=task_id)
    assert host_processes_matching(sleep) == []


def test_a_chatty_job_is_read_while_idle_and_while_a_command_runs(
    sandbox: SandboxServer,
) -> None:
    total = 50_000_000 + len("end\n")
    task_id = start_job(sandbox, "slot_1", "yes | head -c 50000000; echo end")
    time.sleep(1.5)  # no request: only the idle agent reads the pipe
    state = check(sandbox, "slot_1", task_id)
    assert state["status"] == "exited" and state["runtime_s"] < 1.5, state
    assert state["output_bytes"] == total
    # Bounded: the head and the tail are kept, the middle only counted.
    assert state["output_dropped_bytes"] == total - BUFFER_BYTES
    assert state["output"] == "y\n" * (len(state["output"]) // 2)
    past_head = check(sandbox, "slot_1", task_id, BUFFER_BYTES // 2)
    assert past_head["dropped_bytes"] > 0
    assert past_head["next"] - past_head["since"] - past_head["dropped_bytes"] == 65536
    end = check(sandbox, "slot_1", task_id, total - 6)
    assert end["output"] == "y\nend\n" and end["next"] == total and not end["more"]

    # While a foreground command runs, the job's pipe is read by its supervision loop: the job
    # starts writing once the command runs, and is done long before the command is.
    task_id = start_job(sandbox, "slot_1", "sleep 0.5; yes | head -c 20000000; echo end")
    assert sandbox.sh("slot_1", "sleep 2.5")["success"]
    state = check(sandbox, "slot_1", task_id)
    assert state["status"] == "exited" and state["runtime_s"] < 2, state


def test_jobs_are_capped_per_slot_and_a_reset_kills_them(sandbox: SandboxServer) -> None:
    marker = f"30.{random.randrange(10**6):06d}"
    ids = [start_job(sandbox, "slot_2", f"sleep {marker}{i}") for i in range(MAX_RUNNING)]
    refused = call(sandbox, "slot_2", "background_run", command="true")
    assert refused["success"] is False
    assert f"already runs {MAX_RUNNING} background jobs" in refused["error"]
    # A job of one slot is not another slot's.
    elsewhere = call(sandbox, "slot_3", "check_background", task_id=ids[0])
    assert elsewhere["success"] is False and "no background job" in elsewhere["error"]
    listed = call(sandbox, "slot_3", "check_background")["metadata"]["jobs"]
    assert not {job["task_id"] for job in listed} & set(ids)
    # One ended: room for one more.
    call(sandbox, "slot_2", "background_kill", task_id=ids[0])
    start_job(sandbox, "slot_2", f"sleep {marker}99")

    # The killed job's process goes and the new one's comes as the kernel gets to them.
    wait_for(
        lambda: len(host_processes_matching(f"sleep {marker}")) == MAX_RUNNING,
        5,
        f"{MAX_RUNNING} jobs running",
    )
    reset(sandbox, "slot_2")
    wait_for(lambda: not host_processes_matching(f"sleep {marker}"), 5, "the reset's kill")
    gone = call(sandbox, "slot_2", "check_background", task_id=ids[1])
    assert gone["success"] is False and "reset" in gone["error"]
    assert call(sandbox, "slot_2", "check_background")["output"] == "no background jobs"


def test_finished_jobs_are_kept_up_to_a_bound_oldest_forgotten(sandbox: SandboxServer) -> None:
    reset(sandbox, "slot_0")
    ids = []
    for number in range(MAX_KEPT + 2):
        ids.append(start_job(sandbox, "slot_0", f"echo {number}"))
        until_ended(sandbox, "slot_0", ids[-1], 5)
    listed = call(sandbox, "slot_0", "check_background")["metadata"]["jobs"]
    assert [job["task_id"] for job in listed] == ids[2:]
    for forgotten in ids[:2]:
        gone = call(sandbox, "slot_0", "check_background", task_id=forgotten)
        assert gone["success"] is False and "no background job" in gone["error"]
    assert check(sandbox, "slot_0", ids[2])["output"] == "2\n"


def test_job_output_numbers_its_bytes_and_keeps_head_and_tail() -> None:
    output = JobOutput(8)  # a head of 4 bytes, a tail of at least 4
    output.feed(b"abcdef")
    assert output.read(0, 100, complete=False) == (b"abcd", 0)
    assert output.read(4, 100, complete=False) == (b"ef", 4)
    assert output.read(1, 2, complete=False) == (b"bc", 1)
    output.feed(b"ghijklmnop")
    assert output.total == 16 and output.tail_start == 12 and output.dropped == 8
    assert output.read(4, 100, complete=False) == (b"mnop", 12)  # 8 bytes dropped before it
    assert output.read(14, 100, complete=False) == (b"op", 14)

    # A character cut where the output ends so far waits for the rest of it.
    accent = "é".encode()
    text = JobOutput(100)
    text.feed(b"a" + accent[:1])
    assert text.read(0, 100, complete=False) == (b"a", 0)
    assert text.read(0, 100, complete=True) == (b"a" + accent[:1], 0)  # nothing follows
    text.feed(accent[1:] + b"z")
    assert text.read(1, 100, complete=False) == (accent + b"z", 1)
    assert text.read(0, 2, complete=False) == (b"a", 0)  # nor is one cut by the bound


def test_bad_arguments_fail_the_call(sandbox: SandboxServer) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("background_run", {}, "'command' must be a string"),
        ("background_run", {"command": "true", "timeout": "soon"}, "'timeout' must be"),
        ("background_run", {"command": "true", "timeout": -1}, "'timeout' must be"),
        ("check_background", {"task_id": 7}, "'task_id' must be a string"),
        ("check_background", {"task_id": "job-0", "since": 0}, "no background job"),
        ("background_kill", {}, "'task_id' must be a string"),
    ]
    for tool, args, expected in cases:
        result = call(sandbox, "slot_3", tool, **args)
        assert result["success"] is False and expected in result["error"], (tool, result)
    task_id = start_job(sandbox, "slot_3", "true")
    for since in (-1, 1.5, "0", True):
        result = call(sandbox, "slot_3", "check_background", task_id=task_id, since=since)
        assert result["success"] is False and "'since' must be" in result["error"], since


def test_a_job_through_the_executor(executor: ExecutorServer) -> None:
    tools = {
        tool["function"]["name"]: tool for tool in executor.client.get("/tools").json()["tools"]
    }
    assert {"background_run", "check_background", "background_kill"} <= set(tools)
    assert "background" in tools["terminal"]["function"]["parameters"]["properties"]

    trajectory = f"jobs-{random.randrange(10**6)}"
    started = executor.call(trajectory, "background_run", command="sleep 0.5; echo via executor")
    assert started["success"] is True, started
    task_id = started["metadata"]["task_id"]
    deadline = time.monotonic() + 10
    while True:
        state = executor.call(trajectory, "check_background", task_id=task_id)
        assert state["success"] is True, state
        if state["metadata"]["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["metadata"]["status"] == "exited" and state["metadata"]["exit_code"] == 0
    assert state["output"] == "via executor\n" and state["metadata"]["next"] == 13
    executor.client.post("/release", json={"trajectory_id": trajectory})
