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
    assert arrivals[2][1]["output"] == "slow\n"


def test_stream_refuses_bad_batches_before_running(sandbox: SandboxServer) -> None:
    bad = [
        {"slot_id": "slot_0", "tool": "write_file", "args": {"path": "streamed", "content": ""}},
        {"slot_id": "slot_0", "tool": "teleport"},
    ]
    assert sandbox.client.post("/batch/stream", json=bad).status_code == 400
    assert not sandbox.run("slot_0", "read_file", path="streamed")["success"]
