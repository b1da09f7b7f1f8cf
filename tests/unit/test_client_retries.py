"""What the trainer-side client retries, and what it never sends twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from atropos_agent.client import AsyncExecutorClient, ExecutorClient, ExecutorError
from atropos_agent.client.transport import Answer, MockTransport, Request
from atropos_agent.errors import ExecutorUnreachable

URL = "http://executor"
RESULT = json.dumps({"success": True, "output": "ok", "error": "", "metadata": {}}).encode()
LIST = json.dumps({"success": True, "entries": []}).encode()


def refused() -> ExecutorUnreachable:
    return ExecutorUnreachable(URL, "executor did not answer: connection refused", sent=False)


def cut() -> ExecutorUnreachable:
    return ExecutorUnreachable(URL, "executor did not answer: server disconnected", sent=True)


def timed_out() -> ExecutorUnreachable:
    return ExecutorUnreachable(URL, "executor did not answer in time", sent=True, timed_out=True)


def scripted(
    *outcomes: Answer | Exception,
) -> tuple[list[Request], Callable[[Request], Answer]]:
    """A transport handler answering ``outcomes`` in turn; the requests it was sent, in order."""
    sent: list[Request] = []
    pending = list(outcomes)

    def handle(request: Request) -> Answer:
        sent.append(request)
        outcome = pending.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return sent, handle


def paths(sent: list[Request]) -> list[str]:
    return [request.url.removeprefix(URL) for request in sent]


def client_for(handle: Callable[[Request], Answer], retries: int = 3) -> ExecutorClient:
    return ExecutorClient(URL, retries=retries, transport=MockTransport(handle))


def test_a_request_that_never_reached_the_service_is_retried() -> None:
    sent, handle = scripted(refused(), Answer(200, RESULT))
    with client_for(handle) as client:
        assert client.execute("t", "terminal", {"command": "true"}).output == "ok"
    assert paths(sent) == ["/execute", "/execute"]


def test_an_execute_is_sent_again_with_the_same_uniq_id() -> None:
    """Safe because the service runs a call once per uniq_id (docs/executor.md)."""
    sent, handle = scripted(cut(), Answer(200, RESULT))
    with client_for(handle) as client:
        assert client.execute("t", "terminal", {"command": "echo once >> f"}).success
    assert paths(sent) == ["/execute", "/execute"]
    ids = [json.loads(request.body or b"")["tool"]["uniq_id"] for request in sent]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_an_execute_that_timed_out_is_not_sent_again() -> None:
    """It already waited the longest a command may take."""
    sent, handle = scripted(timed_out())
    with client_for(handle) as client, pytest.raises(ExecutorUnreachable) as failed:
        client.execute("t", "terminal", {"command": "sleep 1000"})
    assert failed.value.timed_out and failed.value.status == 503
    assert paths(sent) == ["/execute"]


def test_a_release_that_may_have_happened_is_not_sent_twice() -> None:
    sent, handle = scripted(cut())
    with client_for(handle) as client, pytest.raises(ExecutorUnreachable) as failed:
        client.release("t")
    assert failed.value.sent and failed.value.url == URL
    assert paths(sent) == ["/release"]


def test_a_read_is_retried_after_any_transport_failure() -> None:
    sent, handle = scripted(cut(), cut(), Answer(200, LIST))
    with client_for(handle) as client:
        assert client.list_artifacts("t").success
    assert paths(sent) == ["/artifacts/list"] * 3


def test_a_503_with_retry_after_is_retried_then_given_back() -> None:
    busy = Answer(503, json.dumps({"error": "queue full"}).encode(), retry_after="0")
    sent, handle = scripted(busy, busy, busy)
    with client_for(handle, retries=2) as client, pytest.raises(ExecutorError) as refused_:
        client.execute("t", "terminal", {"command": "true"})
    assert refused_.value.status == 503 and "queue full" in refused_.value.message
    assert len(sent) == 3


def test_other_errors_are_given_back_at_once() -> None:
    sent, handle = scripted(Answer(404, json.dumps({"error": "unknown trajectory"}).encode()))
    with client_for(handle) as client, pytest.raises(ExecutorError) as failed:
        client.release("t")
    assert failed.value.status == 404 and failed.value.message == "unknown trajectory"
    assert paths(sent) == ["/release"]


def test_the_async_client_retries_alike() -> None:
    sent, handle = scripted(refused(), Answer(200, RESULT))

    async def scenario() -> str:
        async with AsyncExecutorClient(URL, transport=MockTransport(handle)) as client:
            return (await client.execute("t", "terminal", {"command": "true"})).output

    assert asyncio.run(scenario()) == "ok"
    assert paths(sent) == ["/execute", "/execute"]


def test_the_sync_client_serves_many_threads_at_once() -> None:
    def handle(request: Request) -> Answer:
        body = json.loads(request.body or b"")
        output = body["trajectory_id"]
        answer = {"success": True, "output": output, "error": "", "metadata": {}}
        return Answer(200, json.dumps(answer).encode())

    with client_for(handle) as client, ThreadPoolExecutor(16) as threads:
        outputs = list(
            threads.map(lambda n: client.execute(f"t{n}", "terminal").output, range(200))
        )
    assert outputs == [f"t{n}" for n in range(200)]
    assert client.closed and not client._loop.thread.is_alive()
