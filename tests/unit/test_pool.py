"""The pool through the transport seam: leases, reset before reuse, retirement, scaling."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest

from atropos_agent.errors import NoFreeSlot
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.scaling import wanted_sandboxes
from atropos_agent.executor.transport import MockResponse, MockTransport, Request
from tests.unit.fakes import FakeBackend, FakeCluster, pool_settings, run


def new_pool(**settings: float) -> tuple[Pool, FakeBackend, FakeCluster]:
    cluster = FakeCluster()
    backend = FakeBackend(cluster)
    return Pool(pool_settings(**settings), backend, cluster.transport), backend, cluster


async def settle() -> None:
    """Let the pool's background resets run."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_leases_go_to_the_lowest_index_sandbox_one_trajectory_per_slot() -> None:
    pool, _, _ = new_pool(min_sandboxes=2)

    async def scenario() -> None:
        await pool.start()
        leases = [await pool.acquire(f"t{i}", 1.0) for i in range(3)]
        assert [(lease.sandbox.sandbox_id, lease.slot_id) for lease in leases] == [
            ("fake-0", "slot_0"),
            ("fake-0", "slot_1"),
            ("fake-1", "slot_0"),
        ]
        assert pool.sandboxes["fake-0"].leased == {"slot_0": "t0", "slot_1": "t1"}
        await pool.stop()

    run(scenario())


def test_a_released_slot_is_reset_before_anyone_else_gets_it() -> None:
    pool, _, cluster = new_pool(min_sandboxes=1, max_sandboxes=1)

    async def scenario() -> None:
        await pool.start()
        sandbox = cluster.sandboxes["http://sandbox-0"]
        first = await pool.acquire("t1", 1.0)
        await pool.acquire("t2", 1.0)
        waiting = asyncio.create_task(pool.acquire("t3", 2.0))
        await settle()
        assert not waiting.done(), "no slot is free until a release"
        pool.release(first)
        assert first.slot_id in pool.sandboxes["fake-0"].resetting
        third = await waiting
        assert third.slot_id == first.slot_id
        assert sandbox.resets == [first.slot_id], "the reset came before the new lease"
        await pool.stop()

    run(scenario())


def test_a_slot_whose_reset_failed_is_never_handed_out_again() -> None:
    pool, _, cluster = new_pool(min_sandboxes=1, max_sandboxes=1)

    async def scenario() -> None:
        await pool.start()
        cluster.sandboxes["http://sandbox-0"].failing_resets.add("slot_0")
        lease = await pool.acquire("t1", 1.0)
        await pool.release(lease)
        await settle()
        assert pool.sandboxes["fake-0"].free == ["slot_1"]
        await pool.acquire("t2", 1.0)
        with pytest.raises(NoFreeSlot, match=r"no free slot within 0\.2s"):
            await pool.acquire("t3", 0.2)
        await pool.stop()

    run(scenario())


def test_two_failed_health_checks_retire_a_sandbox_and_lose_its_leases() -> None:
    pool, backend, cluster = new_pool(min_sandboxes=2)

    async def scenario() -> None:
        await pool.start()
        lease = await pool.acquire("t1", 1.0)
        cluster.sandboxes["http://sandbox-0"].answering = False
        await pool.check_health()
        assert not lease.lost, "one failed check is not enough"
        await pool.check_health()
        assert lease.lost
        assert "fake-0" not in pool.sandboxes and backend.replaced == ["fake-0"]
        # It answers again: the same instance is never admitted back.
        cluster.sandboxes["http://sandbox-0"].answering = True
        backend.listed["fake-0"] = lease.sandbox.info
        await pool.sync()
        assert "fake-0" not in pool.sandboxes
        assert pool.lost_sandboxes == 1
        await pool.stop()

    run(scenario())


def test_a_sandbox_restarted_in_place_is_retired_at_once() -> None:
    pool, _, cluster = new_pool()

    async def scenario() -> None:
        await pool.start()
        lease = await pool.acquire("t1", 1.0)
        cluster.sandboxes["http://sandbox-0"].instance_id = "instance-2"
        assert not await pool.probe(pool.sandboxes["fake-0"], failures_to_retire=2)
        assert lease.lost
        await pool.stop()

    run(scenario())


def test_slots_that_ran_calls_before_admission_are_reset_first() -> None:
    cluster = FakeCluster()
    backend = FakeBackend(cluster)
    taken_over = backend.launch()
    taken_over.calls["slot_0"] = 3  # an earlier executor's trajectory used it
    pool = Pool(pool_settings(min_sandboxes=0), backend, cluster.transport)

    async def scenario() -> None:
        await pool.start()
        admitted = pool.sandboxes["fake-0"]
        assert admitted.free == ["slot_1"] and admitted.resetting == {"slot_0"}
        await settle()
        assert taken_over.resets == ["slot_0"] and sorted(admitted.free) == ["slot_0", "slot_1"]
        await pool.stop()

    run(scenario())


def test_a_sandbox_of_another_protocol_is_refused_and_health_says_why() -> None:
    cluster = FakeCluster()
    backend = FakeBackend(cluster)
    backend.launch().protocol_version = 1
    pool = Pool(pool_settings(min_sandboxes=0), backend, cluster.transport)

    async def scenario() -> None:
        await pool.start()
        assert pool.sandboxes == {}
        ok, reason = pool.healthy()
        assert not ok and "speaks protocol 1" in reason
        assert "fake-0" in pool.describe()["refused_sandboxes"]
        await pool.stop()

    run(scenario())


def test_callers_waiting_for_slots_scale_the_pool_up_at_once() -> None:
    pool, backend, _ = new_pool(min_sandboxes=1, max_sandboxes=3, health_interval_s=3600)

    async def scenario() -> None:
        await pool.start()
        leases = await asyncio.gather(*(pool.acquire(f"t{i}", 2.0) for i in range(5)))
        assert backend.scale_requests == [3]
        assert sorted({lease.sandbox.sandbox_id for lease in leases}) == [
            "fake-0",
            "fake-1",
            "fake-2",
        ]
        await pool.stop()

    started = time.monotonic()
    run(scenario())
    assert time.monotonic() - started < 2.0, "woken at once, not at the hourly health tick"


def test_shrinking_drains_idle_sandboxes_and_passes_none_that_is_busy() -> None:
    pool, _, _ = new_pool(min_sandboxes=3, max_sandboxes=3, scale_down_idle_s=0.0)

    async def scenario() -> None:
        await pool.start()
        await pool.acquire("t0", 1.0)
        pool.settings = pool_settings(min_sandboxes=1, max_sandboxes=3, scale_down_idle_s=0.0)
        wanted = pool.desired_count()
        assert wanted == 1
        await pool._scale(wanted)  # what the monitor runs
        assert sorted(pool.sandboxes) == ["fake-0"]
        await pool.stop()

    run(scenario())


@dataclass
class Load:
    busy_slots: int = 0
    idle: bool = True
    idle_since: float = 0.0


@pytest.mark.parametrize(
    ("live", "waiting", "wanted"),
    [
        ([Load(2, False)], 1, 2),  # one more for one waiter
        ([Load(2, False)], 5, 3),  # as many as the demand needs, up to the maximum
        ([Load(2, False)] * 3, 4, None),  # at the maximum already
        ([Load(), Load(), Load()], 0, 1),  # all quiet: down to the minimum
        ([Load(), Load(), Load(1, False)], 0, None),  # the busy one is last: nothing goes
        ([Load(), Load(1, False), Load()], 0, 2),  # down to the busy one, never past it
        ([Load(), Load(idle_since=95.0)], 0, None),  # not quiet for long enough yet
    ],
)
def test_wanted_sandboxes(live: list[Load], waiting: int, wanted: int | None) -> None:
    settings = pool_settings(min_sandboxes=1, max_sandboxes=3, scale_down_idle_s=10.0)
    assert wanted_sandboxes(live, waiting, settings, now=100.0) == wanted


def test_a_failed_reset_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster()

    async def reset_answers_nothing(request: Request) -> MockResponse:
        if request.url.endswith("/reset"):
            return MockResponse(500, b"")
        return await cluster.handle(request)

    pool = Pool(pool_settings(), FakeBackend(cluster), MockTransport(reset_answers_nothing))

    async def scenario() -> None:
        await pool.start()
        await pool.release(await pool.acquire("t1", 1.0))
        await pool.stop()

    with caplog.at_level(logging.ERROR, logger="atropos.pool"):
        run(scenario())
    (failed,) = [r.getMessage() for r in caplog.records if "slot_reset_failed" in r.getMessage()]
    assert failed.endswith("error=sandbox at http://sandbox-0 answered 500: an empty body")


def test_a_sandbox_two_syncs_find_at_once_is_admitted_once() -> None:
    """A health tick and a scale-up's polling may both find a new sandbox; a second admission
    must not replace the first, whose slots may already be leased."""
    cluster = FakeCluster()
    delays = [0.0, 0.05]  # the first sync's admission answers at once, the second's later

    async def answer(request: Request) -> MockResponse:
        if request.url == "http://sandbox-1/health":
            await asyncio.sleep(delays.pop(0))
        return await cluster.handle(request)

    backend = FakeBackend(cluster)
    pool = Pool(pool_settings(min_sandboxes=1, max_sandboxes=2), backend, MockTransport(answer))

    async def scenario() -> None:
        await pool.start()
        backend.launch()
        first = asyncio.create_task(pool.sync())
        second = asyncio.create_task(pool.sync())
        await first
        leases = [await pool.acquire(f"t{i}", 1.0) for i in range(4)]
        await second
        assert len({(lease.sandbox.sandbox_id, lease.slot_id) for lease in leases}) == 4
        with pytest.raises(NoFreeSlot):
            await pool.acquire("t4", 0.2)
        await pool.stop()

    run(scenario())
