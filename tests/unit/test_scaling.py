"""Who sets the sandbox count and to what: headroom, the wanted gauge, scaling from outside,
and what the pool's metrics record of it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from atropos_agent.errors import NoFreeSlot
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.scaling import sandboxes_wanted, wanted_sandboxes
from tests.unit.fakes import FakeBackend, FakeCluster, pool_settings, run


@dataclass
class Load:
    busy_slots: int = 0
    idle: bool = True
    idle_since: float = 0.0


BUSY = Load(2, False)  # both slots of a sandbox of 2 leased


@pytest.mark.parametrize(
    ("live", "waiting", "headroom", "wanted"),
    [
        ([BUSY], 0, 0, None),  # full, nobody waits, no headroom: as it is
        ([BUSY], 0, 1, 2),  # full, one free slot wanted: one more sandbox before anyone waits
        ([Load(1, False)], 0, 1, None),  # one slot still free: the headroom is there
        ([BUSY, Load(1, False)], 0, 3, 3),  # 3 busy + 3 spare = 6 slots: 3 sandboxes
        ([BUSY, Load(), Load()], 0, 2, 2),  # shrinking keeps the headroom: 2 busy + 2 spare
        ([BUSY, Load(), Load()], 0, 0, 1),  # without headroom, down to the busy one
        ([BUSY], 1, 2, 3),  # a waiter and headroom: ceil((2 + 1 + 2) / 2)
    ],
)
def test_headroom_keeps_free_slots_ready(
    live: list[Load], waiting: int, headroom: int, wanted: int | None
) -> None:
    settings = pool_settings(
        min_sandboxes=1, max_sandboxes=3, scale_down_idle_s=10.0, headroom_slots=headroom
    )
    assert wanted_sandboxes(live, waiting, settings, now=100.0) == wanted


@pytest.mark.parametrize(
    ("live", "waiting", "headroom", "wanted"),
    [
        ([Load()], 0, 0, 1),  # idle: the minimum
        ([BUSY], 3, 0, 3),  # ceil((2 + 3) / 2), within the maximum
        ([BUSY], 9, 0, 3),  # no more than the maximum
        ([BUSY, Load()], 0, 1, 2),  # ceil((2 + 0 + 1) / 2)
        ([Load(), Load(), Load(1, False)], 0, 0, 3),  # never below a sandbox in use
        ([Load(), Load(idle_since=95.0), Load()], 0, 0, 2),  # nor one used in the quiet period
        ([Load(), Load(), Load()], 0, 0, 1),  # all quiet for long enough: the minimum
    ],
)
def test_sandboxes_wanted_is_the_count_as_one_number(
    live: list[Load], waiting: int, headroom: int, wanted: int
) -> None:
    settings = pool_settings(
        min_sandboxes=1, max_sandboxes=3, scale_down_idle_s=10.0, headroom_slots=headroom
    )
    assert sandboxes_wanted(live, waiting, settings, now=100.0) == wanted


def new_pool(**settings: object) -> tuple[Pool, FakeBackend]:
    cluster = FakeCluster()
    backend = FakeBackend(cluster)
    return Pool(pool_settings(**settings), backend, cluster.transport), backend


def samples(pool: Pool, name: str) -> dict[tuple[str, ...], float]:
    """The values of one metric in the pool's registry, by label values."""
    found = {}
    for family in pool.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sample.labels.values())] = sample.value
    return found


def test_with_external_scaling_the_pool_never_asks_for_a_count() -> None:
    pool, backend = new_pool(min_sandboxes=1, max_sandboxes=3, scaling="external")

    async def scenario() -> None:
        await pool.start()
        leases = [await pool.acquire(f"t{i}", 1.0) for i in range(2)]
        waiting = asyncio.create_task(pool.acquire("t2", 0.5))
        with pytest.raises(NoFreeSlot, match="scaled from outside"):
            await waiting
        assert backend.scale_requests == [] and len(pool.sandboxes) == 1
        # The waiter gave up: the two leases fill the one sandbox there is.
        assert pool.sandboxes_wanted() == 1
        assert samples(pool, "atropos_executor_scale_requests_total") == {
            ("up", "ok"): 0.0,
            ("up", "failed"): 0.0,
            ("down", "ok"): 0.0,
            ("down", "failed"): 0.0,
        }
        for lease in leases:
            pool.release(lease)
        await pool.stop()

    run(scenario())


def test_the_gauge_counts_a_waiting_call() -> None:
    pool, _ = new_pool(min_sandboxes=1, max_sandboxes=3, scaling="external")

    async def scenario() -> None:
        await pool.start()
        for i in range(2):
            await pool.acquire(f"t{i}", 1.0)
        waiting = asyncio.create_task(pool.acquire("t2", 5.0))
        await asyncio.sleep(0)
        assert pool.waiting() == 1
        assert pool.sandboxes_wanted() == 2  # ceil((2 + 1) / 2)
        waiting.cancel()
        await pool.stop()

    run(scenario())


def test_the_pool_records_scale_requests_and_waits() -> None:
    pool, backend = new_pool(min_sandboxes=1, max_sandboxes=3, health_interval_s=3600)

    async def scenario() -> None:
        await pool.start()
        await asyncio.gather(*(pool.acquire(f"t{i}", 2.0) for i in range(3)))
        assert backend.scale_requests == [2]
        assert samples(pool, "atropos_executor_scale_requests_total")[("up", "ok")] == 1.0
        # Two leases were free at once, the third waited for the new sandbox.
        assert samples(pool, "atropos_executor_slot_wait_seconds_count") == {(): 3.0}
        await pool.stop()

    run(scenario())
