"""``POST /batch/stream``: each result arrives as soon as it is ready."""

from __future__ import annotations

import json
import time

from harness.servers import SandboxServer


def test_stream_answers_fast_items_before_slow_ones(sandbox: SandboxServer) -> None:
    items = [
        {
            "slot_id": "slot_0",
            "tool": "terminal",
            "args": {"command": "sleep 2; echo slow"},
            "execution_id": "slow",
        },
        {
            "slot_id": "slot_1",
            "tool": "terminal",
            "args": {"command": "echo fast"},
            "execution_id": "fast",
        },
        {
            "slot_id": "slot_1",
            "tool": "terminal",
            "args": {"command": "echo second"},
            "execution_id": "second",
        },
    ]
    started = time.monotonic()
    arrivals = []
    with sandbox.client.stream("POST", "/batch/stream", json=items) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            arrivals.append((time.monotonic() - started, json.loads(line)))
    order = [entry["execution_id"] for _, entry in arrivals]
    assert order == ["fast", "second", "slow"]
    assert [entry["index"] for _, entry in arrivals] == [1, 2, 0]
    assert arrivals[0][0] < 1.0  # did not wait for the slow item
    assert arrivals[2][1]["output"].strip() == "slow"


def test_stream_fails_a_bad_item_alone(sandbox: SandboxServer) -> None:
    items = [
        {"slot_id": "slot_0", "tool": "write_file", "args": {"path": "streamed", "content": ""}},
        {"slot_id": "slot_0", "tool": "teleport", "execution_id": "bad"},
        {"slot_id": "slot_5", "tool": "terminal", "args": {"command": "true"}},
    ]
    with sandbox.client.stream("POST", "/batch/stream", json=items) as response:
        assert response.status_code == 200
        lines = {entry["index"]: entry for entry in map(json.loads, response.iter_lines())}
    assert sorted(lines) == [0, 1, 2]
    assert lines[0]["success"] is True
    assert lines[1]["success"] is False
    assert lines[1]["error"].startswith("Unknown tool: teleport")
    assert lines[1]["execution_id"] == "bad"
    assert lines[1]["metadata"] == {"slot_id": "slot_0"}
    assert lines[2]["error"].startswith("Unknown slot: slot_5")
    assert sandbox.run("slot_0", "read_file", path="streamed")["success"]


def test_stream_refuses_a_body_that_is_not_a_list(sandbox: SandboxServer) -> None:
    response = sandbox.client.post("/batch/stream", json={"slot_id": "slot_0", "tool": "x"})
    assert response.status_code == 422
    assert "a batch must be a JSON list of objects" in response.json()["error"]
