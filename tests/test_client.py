"""The trainer-side client against the real executor: both clients, every method."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from atropos_agent.client import AsyncExecutorClient, ExecutorClient, ExecutorError
from harness.servers import ExecutorServer

METHODS = {
    "execute",
    "execute_batch",
    "release",
    "read_artifact",
    "list_artifacts",
    "archive_artifacts",
    "status",
    "close",
    "open_trajectory",
    "cancel",
    "release_group",
    "execute_stream",
    "upload_dir",
    "upload_file",
    "upload_archive",
    "create_template",
    "list_templates",
    "delete_template",
    "fork",
    "diff",
    "executor_for",
    "statuses",
    "from_nomad",
}
ITERATORS = {"execute_stream"}
# Builds a client, the sync and the async one alike: not a route.
PLAIN = {"from_nomad"}
STATUS_KEYS = {"queue_size", "total_requests", "total_errors", "pool"}


def batch_of(trajectory: str) -> list[dict[str, Any]]:
    """A terminal call that succeeds, then a call of a tool nobody has."""
    return [
        {
            "trajectory_id": trajectory,
            "tool": {"name": "terminal", "arguments": {"command": "echo 1"}},
        },
        {"trajectory_id": trajectory, "tool": {"name": "nope"}},
    ]


def test_both_clients_have_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        names = [
            name
            for name in dir(cls)
            if not name.startswith("_") and not isinstance(getattr(cls, name), property)
        ]
        return {name: inspect.signature(getattr(cls, name)) for name in names}

    sync, asynchronous = public(ExecutorClient), public(AsyncExecutorClient)
    assert set(sync) == set(asynchronous) == METHODS
    for name in METHODS:
        assert sync[name].parameters == asynchronous[name].parameters, name
        assert not inspect.iscoroutinefunction(getattr(ExecutorClient, name)), name
        if name in PLAIN:
            continue
        if name in ITERATORS:  # an iterator on one side, an async iterator on the other
            assert inspect.isgeneratorfunction(getattr(ExecutorClient, name)), name
            assert inspect.isasyncgenfunction(getattr(AsyncExecutorClient, name)), name
        else:
            assert sync[name] == asynchronous[name], name
            assert inspect.iscoroutinefunction(getattr(AsyncExecutorClient, name)), name
    assert hasattr(ExecutorClient, "__enter__") and hasattr(ExecutorClient, "__exit__")
    assert hasattr(AsyncExecutorClient, "__aenter__") and hasattr(AsyncExecutorClient, "__aexit__")


def test_sync_client_round_trip(executor: ExecutorServer) -> None:
    with ExecutorClient(executor.url, token=executor.token) as client:
        written = client.execute("client-a", "write_file", {"path": "n.txt", "content": "hi"})
        assert written.success and written.uniq_id
        result = client.execute("client-a", "terminal", {"command": "cat n.txt"}, timeout_s=5)
        assert result.output == "hi" and result.metadata["exit_code"] == 0
        assert client.read_artifact("client-a", "n.txt").content == "hi"
        assert [e.path for e in client.list_artifacts("client-a").entries] == ["n.txt"]
        assert client.archive_artifacts("client-a").entry_count == 1
        batch = client.execute_batch(batch_of("client-a"))
        assert [r.success for r in batch] == [True, False]
        assert client.status().model_dump().keys() >= STATUS_KEYS
        assert client.release("client-a", reset_workspace=True).status == "ok"
        with pytest.raises(ExecutorError) as refused:
            client.release("client-a")
        assert refused.value.status == 404 and "unknown trajectory" in refused.value.message
    assert client.closed


def test_client_reports_auth_errors(executor: ExecutorServer) -> None:
    with ExecutorClient(executor.url, token="wrong") as client, pytest.raises(ExecutorError) as no:
        client.status()
    assert no.value.status == 403


def test_async_client_round_trip(executor: ExecutorServer) -> None:
    async def scenario() -> None:
        async with AsyncExecutorClient(executor.url, token=executor.token) as client:
            results = await asyncio.gather(
                *(
                    client.execute(f"async-{n}", "terminal", {"command": f"echo {n}"})
                    for n in range(3)
                )
            )
            assert [r.output for r in results] == ["0", "1", "2"]
            written = await client.execute(
                "async-0", "write_file", {"path": "n.txt", "content": "hi"}
            )
            assert written.success and written.uniq_id
            assert (await client.read_artifact("async-0", "n.txt")).content == "hi"
            listing = await client.list_artifacts("async-0")
            assert listing.success
            assert [e.path for e in listing.entries] == ["n.txt"]
            assert (await client.archive_artifacts("async-0")).entry_count == 1
            batch = await client.execute_batch(batch_of("async-0"))
            assert [r.success for r in batch] == [True, False]
            assert (await client.status()).model_dump().keys() >= STATUS_KEYS
            for n in range(3):
                assert (await client.release(f"async-{n}")).released is True
            with pytest.raises(ExecutorError) as refused:
                await client.release("async-0")
            assert refused.value.status == 404 and "unknown trajectory" in refused.value.message
        assert client.closed

    asyncio.run(scenario())


def test_async_client_reports_auth_errors(executor: ExecutorServer) -> None:
    async def scenario() -> None:
        client = AsyncExecutorClient(executor.url, token="wrong")
        try:
            with pytest.raises(ExecutorError) as no:
                await client.status()
            assert no.value.status == 403
        finally:
            await client.close()
        assert client.closed

    asyncio.run(scenario())
