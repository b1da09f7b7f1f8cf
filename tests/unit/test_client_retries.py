"""What the trainer-side client retries, and what it never sends twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from atropos_agent.client import AsyncExecutorClient, ExecutorClient, ExecutorError

RESULT = {"success": True, "output": "ok", "error": "", "metadata": {}}
LIST = {"success": True, "entries": []}


def scripted(
    *outcomes: httpx.Response | Exception,
) -> tuple[list[str], Callable[..., httpx.Response]]:
    """A transport handler answering ``outcomes`` in turn; the paths it was sent, in order."""
    sent: list[str] = []
    pending = list(outcomes)

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        outcome = pending.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return sent, handle


def client_for(handle: Callable[..., httpx.Response], retries: int = 3) -> ExecutorClient:
    return ExecutorClient("http://executor", retries=retries, transport=httpx.MockTransport(handle))


def test_a_request_that_never_reached_the_service_is_retried() -> None:
    sent, handle = scripted(httpx.ConnectError("refused"), httpx.Response(200, json=RESULT))
    with client_for(handle) as client:
        assert client.execute("t", "terminal", {"command": "true"}).output == "ok"
    assert sent == ["/execute", "/execute"]


def test_an_execute_is_sent_again_with_the_same_uniq_id() -> None:
    """Safe because the service runs a call once per uniq_id (docs/executor.md)."""
    sent_ids: list[str] = []
    sent, handle = scripted(
        httpx.RemoteProtocolError("server disconnected"), httpx.Response(200, json=RESULT)
    )

    def recording(request: httpx.Request) -> httpx.Response:
        sent_ids.append(json.loads(request.content)["tool"]["uniq_id"])
        return handle(request)

    with client_for(recording) as client:
        assert client.execute("t", "terminal", {"command": "echo once >> f"}).success
    assert sent == ["/execute", "/execute"]
    assert len(sent_ids) == 2 and sent_ids[0] == sent_ids[1]


def test_a_release_that_may_have_happened_is_not_sent_twice() -> None:
    sent, handle = scripted(httpx.RemoteProtocolError("server disconnected"))
    with client_for(handle) as client, pytest.raises(httpx.RemoteProtocolError):
        client.release("t")
    assert sent == ["/release"]


def test_a_read_is_retried_after_any_transport_failure() -> None:
    sent, handle = scripted(
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("reset"),
        httpx.Response(200, json=LIST),
    )
    with client_for(handle) as client:
        assert client.list_artifacts("t").success
    assert sent == ["/artifacts/list"] * 3


def test_a_503_with_retry_after_is_retried_then_given_back() -> None:
    busy = httpx.Response(503, json={"error": "queue full"}, headers={"Retry-After": "0"})
    sent, handle = scripted(busy, busy, busy)
    with client_for(handle, retries=2) as client, pytest.raises(ExecutorError) as refused:
        client.execute("t", "terminal", {"command": "true"})
    assert refused.value.status == 503 and "queue full" in refused.value.message
    assert len(sent) == 3


def test_other_errors_are_given_back_at_once() -> None:
    sent, handle = scripted(httpx.Response(404, json={"error": "unknown trajectory"}))
    with client_for(handle) as client, pytest.raises(ExecutorError):
        client.release("t")
    assert sent == ["/release"]


def test_the_async_client_retries_alike() -> None:
    sent, handle = scripted(httpx.ConnectError("refused"), httpx.Response(200, json=RESULT))

    async def scenario() -> str:
        transport = httpx.MockTransport(handle)
        async with AsyncExecutorClient("http://executor", transport=transport) as client:
            return (await client.execute("t", "terminal", {"command": "true"})).output

    assert asyncio.run(scenario()) == "ok"
    assert sent == ["/execute", "/execute"]
