"""The live progress of a bench run: one bar per phase (a level against a target, or the spawn
loop), with its calls, rate and errors so far, refreshed a few times a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from atropos_agent.bench.load import Level, LevelSamples
from atropos_agent.bench.spawn_loop import START_DELAY_S, SpawnLoopResult, run_spawn_loop

T = TypeVar("T")
TICK_S = 0.25


def errors_text(errors: int) -> str:
    return f"[red]{errors:,} errors[/]" if errors else ""


class RunProgress:
    """``with RunProgress(console) as progress: await progress.level(...)``."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[calls]:>9,} calls {task.fields[rate]:>9} calls/s"),
            TextColumn("{task.fields[errors]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> RunProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(None, None, None)

    def _task(self, name: str, total: float) -> TaskID:
        return self.bars.add_task(name, total=total, calls=0, rate="", errors="")

    async def level(self, level: Level, path: str) -> LevelSamples:
        """Run ``level``; its bar shows the leasing, then the timed window."""
        name = f"{level.concurrency} trajectories · {path}"
        budget = level.budget
        by_time = budget.duration_s is not None
        total = budget.duration_s if by_time else level.concurrency * (budget.calls or 0)
        assert total is not None
        task = self._task(name, total)

        def update() -> None:
            samples = level.samples
            errors = errors_text(sum(samples.errors.values()))
            if samples.opened_at is None:
                leasing = f"{name} (leasing {level.leased}/{level.concurrency})"
                self.bars.update(task, description=leasing, errors=errors)
                return
            elapsed = time.monotonic() - samples.opened_at
            self.bars.update(
                task,
                description=name,
                completed=min(elapsed, total) if by_time else samples.calls,
                calls=samples.calls,
                rate=f"{samples.calls / elapsed:,.1f}" if elapsed > 0 else "",
                errors=errors,
            )

        samples = await ticking(level.run(), update)
        update()
        rate = samples.calls / samples.elapsed_s if samples.elapsed_s else 0.0
        self.bars.update(task, completed=total, rate=f"{rate:,.1f}")
        return samples

    async def spawn_loop(self, window_s: float, workers: int | None) -> SpawnLoopResult:
        task = self._task("bash -c spawn loop", window_s)
        opens = time.monotonic() + START_DELAY_S

        def update() -> None:
            self.bars.update(task, completed=min(window_s, max(0.0, time.monotonic() - opens)))

        result = await ticking(run_spawn_loop(window_s, workers), update)
        self.bars.update(
            task,
            completed=window_s,
            calls=result.calls,
            rate=f"{result.calls_per_s:,.1f}",
            errors=errors_text(result.errors),
        )
        return result


async def ticking(work: Awaitable[T], tick: Callable[[], None]) -> T:
    """Await ``work``, calling ``tick`` every TICK_S meanwhile."""
    running = asyncio.ensure_future(work)
    try:
        while not running.done():
            await asyncio.wait([running], timeout=TICK_S)
            tick()
        return running.result()
    finally:
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
