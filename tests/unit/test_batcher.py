"""The batcher through the transport seam: window, max size, lone calls, stream order."""

from __future__ import annotations

import asyncio
import time

import pytest

from atropos_agent.errors import SandboxUnavailable
from atropos_agent.executor.batcher import Batcher
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.transport import MockResponse, MockTransport, Request
from atropos_agent.sandbox.protocol import BatchItem, BatchResult
from tests.unit.fakes import TOKEN, FakeCluster, FakeSandbox, run


def setup(window_s: float = 0.05, max_size: int = 200) -> tuple[FakeSandbox, Batcher]:
    cluster = FakeCluster()
    sandbox = cluster.add("http://sandbox-0", slots=8)
    client = SandboxClient(sandbox.url, cluster.transport, TOKEN)
    return sandbox, Batcher(client, window_s, max_size)


def item(slot: int, command: str, uniq_id: str | None = None) -> BatchItem:
    return BatchItem(
        slot_id=f"slot_{slot}",
        tool="terminal",
        args={"command": command},
        uniq_id=uniq_id,
        timeout=30,
    )


def test_a_lone_call_goes_at_once_without_waiting_for_the_window() -> None:
    sandbox, batcher = setup(window_s=5.0)

    async def scenario() -> tuple[BatchResult, float]:
        started = time.monotonic()
        result = await batcher.submit(item(0, "echo hi", "u1"))
        return result, time.monotonic() - started

    result, elapsed = run(scenario())
    assert result.output == "hi\n" and result.uniq_id == "u1"
    assert elapsed < 1.0  # far below the 5 s window
    assert len(sandbox.batches) == 1


def test_calls_submitted_together_share_one_request() -> None:
    sandbox, batcher = setup()

    async def scenario() -> list[BatchResult]:
        return await asyncio.gather(*(batcher.submit(item(i, f"echo {i}")) for i in range(5)))

    results = run(scenario())
    assert [r.output for r in results] == [f"{i}\n" for i in range(5)]
    assert [len(batch) for batch in sandbox.batches] == [5]


def test_calls_arriving_while_a_batch_is_in_flight_gather_for_the_window() -> None:
    sandbox, batcher = setup(window_s=0.1)
    gate = sandbox.gates["echo first"] = asyncio.Event()

    async def scenario() -> None:
        first = asyncio.create_task(batcher.submit(item(0, "echo first")))
        await asyncio.sleep(0.01)  # the first batch is in flight now
        later = [asyncio.create_task(batcher.submit(item(i, f"echo {i}"))) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert len(sandbox.batches) == 1, "later calls must wait for the window"
        await asyncio.gather(*later)
        gate.set()
        await first

    run(scenario())
    assert [len(batch) for batch in sandbox.batches] == [1, 3]


def test_max_size_splits_and_sends_without_waiting() -> None:
    sandbox, batcher = setup(window_s=5.0, max_size=3)

    async def scenario() -> None:
        await asyncio.gather(*(batcher.submit(item(i % 8, f"echo {i}")) for i in range(7)))

    started = time.monotonic()
    run(scenario())
    assert time.monotonic() - started < 1.0
    assert sorted(len(batch) for batch in sandbox.batches) == [1, 3, 3]


def test_each_result_is_handed_back_as_soon_as_its_call_finished() -> None:
    sandbox, batcher = setup()
    gate = sandbox.gates["echo slow"] = asyncio.Event()

    async def scenario() -> None:
        slow = asyncio.create_task(batcher.submit(item(0, "echo slow")))
        fast = asyncio.create_task(batcher.submit(item(1, "echo fast")))
        assert (await fast).output == "fast\n"
        assert not slow.done(), "the slow call of the same batch is still running"
        gate.set()
        assert (await slow).output == "slow\n"

    run(scenario())
    assert len(sandbox.batches) == 1


def test_a_sandbox_that_dies_mid_batch_fails_the_calls_it_did_not_answer() -> None:
    sandbox, batcher = setup()
    gate = sandbox.gates["echo stuck"] = asyncio.Event()

    async def scenario() -> None:
        answered = asyncio.create_task(batcher.submit(item(0, "echo ok")))
        stuck = asyncio.create_task(batcher.submit(item(1, "echo stuck")))
        assert (await answered).output == "ok\n"
        sandbox.answering = False
        gate.set()
        with pytest.raises(SandboxUnavailable, match="died mid-batch"):
            await stuck
        assert batcher.in_flight == 0 and batcher.in_flight_calls == 0

    run(scenario())


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b'{"index": 7, "success": true}\n', b'{"success": true}\n'],
    ids=["malformed", "index-out-of-range", "no-index"],
)
def test_a_bad_result_line_fails_the_call_clearly(line: bytes) -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(200, line)

    batcher = Batcher(SandboxClient("http://odd", MockTransport(answer)), 0.01, 10)
    with pytest.raises(SandboxUnavailable, match="http://odd"):
        run(batcher.submit(item(0, "echo hi")))


def test_an_http_error_names_the_sandbox_and_its_reason() -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(503, b'{"error": "slot_0 already has 1024 calls waiting"}')

    batcher = Batcher(SandboxClient("http://busy", MockTransport(answer)), 0.01, 10)
    with pytest.raises(SandboxUnavailable, match="answered 503: slot_0 already has"):
        run(batcher.submit(item(0, "echo hi")))


def test_close_fails_what_is_queued_and_refuses_new_calls() -> None:
    sandbox, batcher = setup(window_s=5.0)
    sandbox.gates["echo first"] = asyncio.Event()  # never set: the batch stays in flight

    async def scenario() -> None:
        first = asyncio.create_task(batcher.submit(item(0, "echo first")))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit(item(1, "echo queued")))
        await asyncio.sleep(0.01)
        await batcher.close()
        for call in (first, queued):
            with pytest.raises(SandboxUnavailable):
                await call
        with pytest.raises(SandboxUnavailable, match="gone"):
            await batcher.submit(item(2, "echo late"))

    run(scenario())
