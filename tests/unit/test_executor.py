"""The executor through the transport seam: order per trajectory, release, expiry, loss."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from atropos_agent.errors import QueueFull, UnknownTrajectory
from atropos_agent.executor import executor as executor_module
from atropos_agent.executor.executor import Executor
from atropos_agent.executor.external_tools import ExternalTools
from atropos_agent.executor.lease_journal import LeaseJournal, journal_path
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.settings import CallSettings
from atropos_agent.models import ArtifactReadRequest, ToolCall, ToolResult
from tests.unit.fakes import FakeBackend, FakeCluster, FakeSandbox, pool_settings, run


@asynccontextmanager
async def running(
    max_queue: int = 100,
    expiry_s: float = 60.0,
    acquire_s: float = 1.0,
    journal: LeaseJournal | None = None,
) -> AsyncIterator[tuple[Executor, FakeCluster]]:
    cluster = FakeCluster()
    pool = Pool(pool_settings(max_sandboxes=1), FakeBackend(cluster), cluster.transport)
    settings = CallSettings(
        max_queue=max_queue, acquire_timeout_s=acquire_s, lease_idle_expiry_s=expiry_s
    )
    executor = Executor(settings, pool, ExternalTools(None, None), journal)
    await executor.start()
    try:
        yield executor, cluster
    finally:
        await executor.stop()


def sandbox_of(cluster: FakeCluster) -> FakeSandbox:
    return cluster.sandboxes["http://sandbox-0"]


async def sh(executor: Executor, trajectory: str, command: str) -> ToolResult:
    executor.admit()
    call = ToolCall(name="terminal", arguments={"command": command}, uniq_id=command)
    return await executor.execute(trajectory, call, None)


def test_calls_of_one_trajectory_run_in_order_others_do_not_wait() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            gate = sandbox_of(cluster).gates["echo a1"] = asyncio.Event()
            first = asyncio.create_task(sh(executor, "a", "echo a1"))
            await asyncio.sleep(0.01)
            second = asyncio.create_task(sh(executor, "a", "echo a2"))
            other = await sh(executor, "b", "echo b1")
            assert other.output == "b1\n" and other.uniq_id == "echo b1"
            assert not second.done(), "a2 waits behind a1"
            gate.set()
            assert (await first).output == "a1\n" and (await second).output == "a2\n"
            started = [command for _, command in sandbox_of(cluster).started]
            assert started.index("echo a1") < started.index("echo a2")
            # Both calls of "a" ran in its one slot.
            slots = {slot for slot, command in sandbox_of(cluster).started if "a" in command}
            assert len(slots) == 1

    run(scenario())


def test_release_during_a_call_waits_for_it_then_frees_and_resets_the_slot() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            gate = sandbox_of(cluster).gates["echo long"] = asyncio.Event()
            call = asyncio.create_task(sh(executor, "t", "echo long"))
            await asyncio.sleep(0.01)
            release = asyncio.create_task(executor.release("t", reset_workspace=True))
            await asyncio.sleep(0.05)
            assert not release.done(), "the release waits for the running call"
            gate.set()
            assert (await call).success
            answer = await release
            assert answer.released
            assert sandbox_of(cluster).resets == ["slot_0"]
            assert "t" not in executor.trajectories
            with pytest.raises(UnknownTrajectory):
                await executor.release("t", reset_workspace=False)

    run(scenario())


def test_an_idle_lease_expires_and_later_calls_are_told_until_released() -> None:
    async def scenario() -> None:
        async with running(expiry_s=0.2) as (executor, cluster):
            assert (await sh(executor, "t", "echo hi")).success
            await asyncio.sleep(0.5)
            late = await sh(executor, "t", "echo again")
            assert not late.success and "expired after 0.2s idle" in late.error
            assert late.metadata["workspace_lost"] is True
            assert sandbox_of(cluster).resets == ["slot_0"]
            assert (await executor.release("t", reset_workspace=False)).released is False
            assert (await sh(executor, "t", "echo fresh")).success

    run(scenario())


def test_a_sandbox_lost_mid_call_loses_the_workspace_clearly() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            sandbox = sandbox_of(cluster)
            gate = sandbox.gates["echo doomed"] = asyncio.Event()
            call = asyncio.create_task(sh(executor, "t", "echo doomed"))
            await asyncio.sleep(0.01)
            sandbox.answering = False
            gate.set()
            result = await call
            assert not result.success and result.metadata["workspace_lost"] is True
            assert "workspace lost for trajectory 't'" in result.error
            again = await sh(executor, "t", "echo more")
            assert again.metadata["workspace_lost"] is True
            read = await executor.read_artifact(ArtifactReadRequest(trajectory_id="t", path="a"))
            assert not read.success and "workspace lost for trajectory 't'" in read.error

    run(scenario())


def test_no_free_slot_answers_a_clear_failure_in_time() -> None:
    async def scenario() -> None:
        async with running(acquire_s=0.3) as (executor, _):
            await sh(executor, "a", "echo 1")
            await sh(executor, "b", "echo 2")  # both slots of the one sandbox are leased
            started = time.monotonic()
            result = await sh(executor, "c", "echo 3")
            assert time.monotonic() - started < 2.0
            assert result.metadata == {
                "acquire_timeout": True,
                "error_kind": "no_slot",
                "retryable": True,
            }
            assert "no free slot within 0.3s" in result.error

    run(scenario())


def test_artifacts_of_a_trajectory_without_a_slot_answer_in_the_route_s_shape() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            read = await executor.read_artifact(ArtifactReadRequest(trajectory_id="x", path="a"))
            assert read.success is False and read.content == ""
            assert read.error.startswith("No active slot for trajectory 'x'")
            assert sandbox_of(cluster).batches == []

    run(scenario())


def test_status_counts_slots_by_the_old_service_s_states() -> None:
    async def scenario() -> None:
        async with running() as (executor, cluster):
            sandbox = sandbox_of(cluster)
            gate = sandbox.gates["echo held"] = asyncio.Event()
            sandbox.failing_resets.add("slot_0")
            await sh(executor, "idle", "echo once")  # slot_0, then released: its reset fails
            await executor.release("idle", reset_workspace=True)
            held = asyncio.create_task(sh(executor, "busy", "echo held"))  # slot_1, running
            await asyncio.sleep(0.05)
            pool = executor.status().pool
            assert pool["slots_by_state"] == {
                "available": 0,
                "acquired": 0,
                "executing": 1,
                "releasing": 0,
                "error": 1,
            }
            assert (pool["total_slots"], pool["available_slots"], pool["acquired_slots"]) == (
                2,
                0,
                1,
            )
            assert pool["containers"] == 1 and pool["started"] is True
            gate.set()
            await held
            assert executor.status().pool["slots_by_state"]["acquired"] == 1

    run(scenario())


def test_unknown_tools_and_a_full_queue_are_refused_before_anything_runs() -> None:
    async def scenario() -> None:
        async with running(max_queue=1) as (executor, cluster):
            executor.admit()
            result = await executor.execute("t", ToolCall(name="nope"), None)
            assert not result.success and "unknown tool 'nope'" in result.error
            assert sandbox_of(cluster).batches == []
            executor.admit()
            with pytest.raises(QueueFull) as refused:
                executor.admit()
            assert refused.value.status_code == 503 and refused.value.retry_after == 1

    run(scenario())


def test_the_journal_follows_leases_and_the_next_executor_recalls_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = journal_path(tmp_path / "state", "local-9001")

    def journaled() -> list[str]:
        with sqlite3.connect(path) as db:
            return [row[0] for row in db.execute("SELECT trajectory_id FROM leases")]

    async def before_the_restart() -> None:
        async with running(journal=LeaseJournal(path, limit=100)) as (executor, _):
            for trajectory in ("held-a", "released", "held-b"):
                assert (await sh(executor, trajectory, f"echo {trajectory}")).success
                if trajectory == "released":
                    await executor.release(trajectory, reset_workspace=True)
            assert sorted(journaled()) == ["held-a", "held-b"]

    async def after_the_restart() -> None:
        async with running(journal=LeaseJournal(path, limit=100)) as (executor, _):
            # Remembering one end at most, the older recalled row is forgotten at once.
            assert journaled() == ["held-b"]
            lost = await sh(executor, "held-b", "echo again")
            assert not lost.success and lost.metadata["workspace_lost"] is True
            assert "the executor restarted" in (lost.error or "")
            answer = await executor.release("held-b", reset_workspace=False)
            assert answer.released is False and answer.note
            assert journaled() == []
            assert (await sh(executor, "held-b", "echo fresh")).success
            assert journaled() == ["held-b"]

    run(before_the_restart())
    monkeypatch.setattr(executor_module, "ENDED_MEMORY", 1)
    run(after_the_restart())
