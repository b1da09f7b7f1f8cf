"""``POST /execute/stream``: a call's output as its command prints it, then its result; a
client that goes away cancels the call. Against the real executor and a real sandbox."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from atropos_agent.client import AsyncExecutorClient, ExecutorClient
from atropos_agent.models import OutputChunk, ToolResult
from harness.processes import host_processes_matching
from harness.servers import ExecutorServer, SandboxServer
from tests.executor_support import release, wait_for

TICKING = "for i in 1 2 3; do echo tick$i; sleep 1; done; echo done >&2"


def body(trajectory: str, command: str) -> dict[str, Any]:
    return {
        "trajectory_id": trajectory,
        "tool": {"name": "terminal", "arguments": {"command": command}},
    }


def test_output_arrives_as_the_command_prints_then_the_result(executor: ExecutorServer) -> None:
    events: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    try:
        with executor.client.stream("POST", "/execute/stream", json=body("ticker", TICKING)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                if line.strip():
                    events.append((time.monotonic() - started, json.loads(line)))
        outputs = [event for _, event in events if event["type"] == "output"]
        first_at = next(at for at, event in events if event["type"] == "output")
        assert first_at < 1.5, f"the first line came after {first_at:.2f}s"
        assert events[-1][0] > 2.0, "the call lasted about 3 s"
        streamed = "".join(e["data"] for e in outputs if e["stream"] == "stdout")
        assert streamed == "tick1\ntick2\ntick3\n"
        assert "".join(e["data"] for e in outputs if e["stream"] == "stderr") == "done\n"
        result = events[-1][1]
        assert result["type"] == "result" and result["success"] is True
        assert result["output"] == "tick1\ntick2\ntick3\n\n[stderr]\ndone"
    finally:
        release(executor, "ticker")


def test_a_client_that_goes_away_cancels_the_streamed_call(executor: ExecutorServer) -> None:
    marker = "sleep 30.35"
    try:
        with executor.client.stream(
            "POST", "/execute/stream", json=body("stream-leaver", f"echo started; {marker}")
        ) as response:
            for line in response.iter_lines():
                if line.strip():
                    assert json.loads(line)["data"] == "started\n"
                    break
        wait_for(lambda: not host_processes_matching(marker), 5, "the command to be killed")
        after = executor.sh("stream-leaver", "echo next")
        assert after["success"] and after["output"] == "next"
    finally:
        release(executor, "stream-leaver")


def test_a_flood_is_streamed_within_its_bound(executor: ExecutorServer) -> None:
    streamed = 0
    try:
        with executor.client.stream(
            "POST", "/execute/stream", json=body("flood", "yes | head -c 20000000")
        ) as response:
            for line in response.iter_lines():
                event = json.loads(line)
                if event["type"] == "output":
                    streamed += len(event["data"])
                else:
                    assert event["success"] is True
                    assert "omitted" in event["output"]  # the answer keeps head and tail
        assert 4 * 1024 * 1024 <= streamed < 4 * 1024 * 1024 + 1000
    finally:
        release(executor, "flood")


def test_the_clients_iterate_over_a_streamed_call(executor: ExecutorServer) -> None:
    token = executor.token
    try:
        with ExecutorClient(executor.url, token) as client:
            events = list(client.execute_stream("iter-sync", "terminal", {"command": TICKING}))
        assert [type(e) for e in events][-1] is ToolResult
        chunks = [e for e in events if isinstance(e, OutputChunk)]
        assert "".join(c.data for c in chunks if c.stream == "stdout") == "tick1\ntick2\ntick3\n"

        async def collect() -> list[OutputChunk | ToolResult]:
            async with AsyncExecutorClient(executor.url, token) as client:
                found = []
                async for event in client.execute_stream(
                    "iter-async", "terminal", {"command": "echo hi"}
                ):
                    found.append(event)
                return found

        found = asyncio.run(collect())
        assert isinstance(found[-1], ToolResult) and found[-1].output == "hi"
        assert any(isinstance(e, OutputChunk) and e.data == "hi\n" for e in found)
    finally:
        release(executor, "iter-sync", "iter-async")


def test_a_call_that_prints_nothing_or_runs_no_command_gives_just_its_result(
    executor: ExecutorServer,
) -> None:
    try:
        for call in (
            body("quiet", "true"),
            {"trajectory_id": "quiet", "tool": {"name": "no-such-tool"}},
        ):
            lines = executor.client.post("/execute/stream", json=call).text.splitlines()
            assert len(lines) == 1 and json.loads(lines[0])["type"] == "result"
    finally:
        release(executor, "quiet")


def test_the_sandbox_streams_one_call(sandbox: SandboxServer) -> None:
    item = {"slot_id": "slot_2", "tool": "terminal", "args": {"command": "echo a; echo b >&2"}}
    with sandbox.client.stream("POST", "/execute/stream", json=item) as response:
        events = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert {(e["stream"], e["data"]) for e in events[:-1]} == {("stdout", "a\n"), ("stderr", "b\n")}
    assert events[-1]["type"] == "result" and events[-1]["output"] == "a\n\n[stderr]\nb"
    refused = sandbox.client.post(
        "/execute/stream", json={"slot_id": "slot_99", "tool": "terminal", "args": {}}
    )
    assert refused.status_code == 200
    only = [json.loads(line) for line in refused.text.splitlines()]
    assert len(only) == 1 and only[0]["success"] is False and "slot_99" in only[0]["error"]


def test_streaming_needs_auth(executor: ExecutorServer) -> None:
    answer = httpx.post(executor.url + "/execute/stream", json=body("x", "true"))
    assert answer.status_code == 401


def test_stateful_python_streams_what_it_prints(executor: ExecutorServer) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\n6 * 7"
    call = {
        "trajectory_id": "py-stream",
        "tool": {"name": "python_stateful", "arguments": {"code": code}},
    }
    started = time.monotonic()
    events: list[tuple[float, dict[str, Any]]] = []
    try:
        with executor.client.stream("POST", "/execute/stream", json=call) as response:
            for line in response.iter_lines():
                if line.strip():
                    events.append((time.monotonic() - started, json.loads(line)))
        printed = [(at, e["data"]) for at, e in events if e["type"] == "output"]
        assert printed and printed[0][1].startswith("first")
        assert printed[0][0] < events[-1][0] - 0.5, "the first line came before the end"
        assert events[-1][1]["success"] is True and "42" in events[-1][1]["output"]
    finally:
        release(executor, "py-stream")
