"""The trainer-side client against the real executor."""

from __future__ import annotations

import asyncio

import pytest

from atropos_agent.client import AsyncExecutorClient, ExecutorClient, ExecutorError
from tests.conftest import ExecutorServer


def test_sync_client_round_trip(executor: ExecutorServer) -> None:
    with ExecutorClient(executor.url, token=executor.token) as client:
        written = client.execute("client-a", "write_file", {"path": "n.txt", "content": "hi"})
        assert written.success and written.uniq_id
        result = client.execute("client-a", "terminal", {"command": "cat n.txt"}, timeout_s=5)
        assert result.output == "hi" and result.metadata["exit_code"] == 0
        assert client.read_artifact("client-a", "n.txt").content == "hi"
        assert [e.path for e in client.list_artifacts("client-a").entries] == ["n.txt"]
        assert client.archive_artifacts("client-a").entry_count == 1
        batch = client.execute_batch(
            [
                {
                    "trajectory_id": "client-a",
                    "tool": {"name": "terminal", "arguments": {"command": "echo 1"}},
                },
                {"trajectory_id": "client-a", "tool": {"name": "nope"}},
            ]
        )
        assert [r.success for r in batch] == [True, False]
        assert client.release("client-a", reset_workspace=True)["status"] == "ok"
        with pytest.raises(ExecutorError) as refused:
            client.release("client-a")
        assert refused.value.status == 404 and "unknown trajectory" in refused.value.message


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
            assert [r.output for r in results] == ["0\n", "1\n", "2\n"]
            listing = await client.list_artifacts("async-0")
            assert listing.success
            for n in range(3):
                assert (await client.release(f"async-{n}"))["released"] is True

    asyncio.run(scenario())
