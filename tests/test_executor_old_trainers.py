"""An old trainer against the real service: the old service's result shapes, exactly.

Requests are built and answers parsed with the old service's payload models as
../shared/PROTOCOL.md gives them (``uniq_id`` required, no extra fields needed), and each
answer is compared with the old shapes of its "Behaviour details" section.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from harness.servers import ExecutorServer
from tests.executor_support import release


class OldToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = {}
    uniq_id: str


class OldToolResult(BaseModel):
    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = {}
    uniq_id: str | None = None


class OldExecuteRequest(BaseModel):
    trajectory_id: str
    tool: OldToolCall
    timeout_s: float | None = None


def call(
    executor: ExecutorServer,
    trajectory: str,
    name: str,
    uniq_id: str,
    timeout_s: float | None = None,
    **arguments: Any,
) -> OldToolResult:
    request = OldExecuteRequest(
        trajectory_id=trajectory,
        tool=OldToolCall(name=name, arguments=arguments, uniq_id=uniq_id),
        timeout_s=timeout_s,
    )
    response = executor.client.post("/execute", json=request.model_dump())
    assert response.status_code == 200, response.text
    result = OldToolResult.model_validate(response.json())
    assert result.uniq_id == uniq_id
    return result


def test_terminal_answers_in_the_old_form(executor: ExecutorServer) -> None:
    trajectory = "old-terminal"
    both = call(executor, trajectory, "terminal", "u1", command="echo out; echo err >&2")
    assert (both.success, both.output, both.error) == (True, "out\n\n[stderr]\nerr", "")
    assert both.metadata["exit_code"] == 0
    assert both.metadata["sandboxed"] is True
    assert both.metadata["network_isolated"] is False

    plain = call(executor, trajectory, "bash", "u2", command="echo hello")
    assert plain.output == "hello"
    only_err = call(executor, trajectory, "terminal", "u3", command="echo oops >&2")
    assert only_err.output == "oops"

    failed = call(executor, trajectory, "terminal", "u4", command="echo x; exit 3")
    assert (failed.success, failed.output, failed.error) == (False, "x", "Exit code: 3")
    assert failed.metadata["exit_code"] == 3

    empty = call(executor, trajectory, "terminal", "u5", command="")
    assert (empty.success, empty.output, empty.error) == (True, "", "")
    assert empty.metadata["exit_code"] == 0
    release(executor, trajectory)


def test_a_timeout_keeps_what_was_printed_so_far(executor: ExecutorServer) -> None:
    trajectory = "old-timeout"
    result = call(
        executor, trajectory, "terminal", "t1", timeout_s=1, command="echo partial; sleep 20"
    )
    assert result.success is False
    assert result.error == "Command timed out after 1s"
    assert result.output == "partial"
    assert result.metadata["timeout"] is True
    assert result.metadata["exit_code"] == -1
    assert result.metadata["sandboxed"] is True
    release(executor, trajectory)


def test_files_and_stateful_tools_carry_the_old_metadata(executor: ExecutorServer) -> None:
    trajectory = "old-files"
    wrote = call(executor, trajectory, "write_file", "w1", path="notes.txt", content="hello")
    assert wrote.success and wrote.output == "Successfully wrote 5 bytes to notes.txt"
    assert wrote.metadata["path"] == "notes.txt" and wrote.metadata["size"] == 5

    empty = call(executor, trajectory, "write_file", "w2", path="empty.txt")
    assert empty.success and empty.output == "Successfully wrote 0 bytes to empty.txt"
    assert empty.metadata["size"] == 0

    read = call(executor, trajectory, "read_file", "r1", path="notes.txt")
    assert read.success and read.output == "hello"
    assert read.metadata["path"] == "notes.txt" and read.metadata["size"] == 5

    directory = call(executor, trajectory, "read_file", "r2", path=".")
    assert directory.success is False and "is a directory" in directory.error

    first = call(executor, trajectory, "terminal_stateful", "s1", command="cd /tmp; X=7")
    assert first.success and first.metadata["stateful"] is True
    second = call(executor, trajectory, "terminal_stateful", "s2", command="echo $X; pwd")
    assert second.output.split() == ["7", "/tmp"]
    assert second.metadata["stateful"] is True
    release(executor, trajectory)


def test_tmux_through_the_executor(executor: ExecutorServer) -> None:
    trajectory = "old-tmux"
    started = call(executor, trajectory, "tmux", "x1", action="start")
    assert (started.success, started.output) == (True, "started"), started.error
    assert started.metadata["stateful"] is True
    sent = call(
        executor, trajectory, "tmux", "x2", action="send_keys", keys="echo from-tmux", block=True
    )
    assert (sent.success, sent.output) == (True, "ok"), sent.error
    assert sent.metadata["blocked"] is True
    captured = call(executor, trajectory, "tmux", "x3", action="capture")
    assert captured.success and "from-tmux" in captured.output
    stopped = call(executor, trajectory, "tmux", "x4", action="stop")
    assert (stopped.success, stopped.output) == (True, "stopped")
    release(executor, trajectory)


def test_status_has_the_old_pool_keys(executor: ExecutorServer) -> None:
    call(executor, "old-status", "terminal", "p1", command="true")
    status = executor.status()
    assert {"queue_size", "total_requests", "total_errors", "pool"} <= status.keys()
    pool = status["pool"]
    assert {
        "total_slots",
        "available_slots",
        "acquired_slots",
        "containers",
        "slots_by_state",
        "started",
    } <= pool.keys()
    states = pool["slots_by_state"]
    assert set(states) == {"available", "acquired", "executing", "releasing", "error"}
    assert sum(states.values()) == pool["total_slots"]
    assert pool["acquired_slots"] >= 1 and pool["started"] is True
    assert pool["containers"] == len(pool["per_sandbox"])
    release(executor, "old-status")
