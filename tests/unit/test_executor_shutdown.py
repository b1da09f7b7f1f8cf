"""The executor's part of a shutdown: no new calls, and calls in flight answered in time."""

from __future__ import annotations

import asyncio

import pytest

from atropos_agent.errors import ShuttingDown
from tests.unit.fakes import run
from tests.unit.test_executor import running, sandbox_of, sh


def test_calls_in_flight_are_answered_when_the_grace_ends() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            sandbox_of(cluster).gates["sleep long"] = asyncio.Event()  # never set
            quick = sandbox_of(cluster).gates["echo quick"] = asyncio.Event()
            stuck = asyncio.create_task(sh(executor, "a", "sleep long"))
            finishing = asyncio.create_task(sh(executor, "b", "echo quick"))
            await asyncio.sleep(0.01)
            executor.begin_shutdown(0.2)
            with pytest.raises(ShuttingDown):
                executor.admit()
            quick.set()  # ends within the grace: its own result
            assert (await finishing).success
            result = await asyncio.wait_for(stuck, 2)
            assert not result.success
            assert result.metadata == {
                "shutting_down": True,
                "error_kind": "sandbox_error",
                "retryable": True,
            }
            assert result.uniq_id == "sleep long"
            assert executor.in_service == 0 and not executor.calls.running

    run(scenario())


def test_a_cancellation_that_is_not_the_shutdowns_still_cancels() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            sandbox_of(cluster).gates["sleep long"] = asyncio.Event()
            call = asyncio.create_task(sh(executor, "a", "sleep long"))
            await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    run(scenario())
