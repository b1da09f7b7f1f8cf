"""The memory of calls by (trajectory, uniq_id): bounded, and forgotten on release."""

from __future__ import annotations

import asyncio

from atropos_agent.executor.replays import ReplayLimits, Replays
from atropos_agent.models import ToolResult


def result(output: str) -> ToolResult:
    return ToolResult(success=True, output=output)


def test_a_finished_call_is_replayed_marked_and_unchanged() -> None:
    async def scenario() -> None:
        replays = Replays(ReplayLimits())
        replays.begin(("t", "u"), 1)
        waiting = replays.running_call(("t", "u"), 1)
        assert waiting is not None and not waiting.done()
        assert replays.running_call(("t", "u"), 2) is None
        replays.finish(("t", "u"), result("once"))
        assert (await waiting).output == "once"
        again = replays.replay(("t", "u"), 1)
        assert again is not None and again.output == "once" and again.metadata["replayed"]
        assert replays.replay(("t", "u"), 2) is None
        stored = replays.stored[("t", "u")][1]
        assert "replayed" not in stored.metadata, "the stored result is not changed"
        assert replays.running_call(("t", "u"), 1) is None

    asyncio.run(scenario())


def test_each_trajectory_keeps_its_latest_calls_and_release_forgets_them() -> None:
    asyncio.run(keeps_latest())


async def keeps_latest() -> None:
    replays = Replays(ReplayLimits(per_trajectory=2))

    def done(key: tuple[str, str], output: str) -> None:
        replays.begin(key, 1)
        replays.finish(key, result(output))

    for uniq_id in ("a", "b", "c"):
        done(("t", uniq_id), uniq_id)
    done(("other", "a"), "x")
    assert replays.replay(("t", "a"), 1) is None
    assert replays.replay(("t", "c"), 1) is not None
    replays.forget("t")
    assert replays.replay(("t", "c"), 1) is None
    assert replays.replay(("other", "a"), 1) is not None
    assert replays.describe()["stored"] == 1


def test_the_byte_budget_forgets_the_oldest_first() -> None:
    asyncio.run(forgets_oldest())


async def forgets_oldest() -> None:
    replays = Replays(ReplayLimits(max_bytes=3 * (1000 + 512)))
    for index in range(5):
        replays.begin((f"t{index}", "u"), 1)
        replays.finish((f"t{index}", "u"), result("x" * 1000))
    assert [key[0] for key in replays.stored] == ["t2", "t3", "t4"]
    assert replays.bytes <= replays.limits.max_bytes
    assert set(replays.by_trajectory) == {"t2", "t3", "t4"}
