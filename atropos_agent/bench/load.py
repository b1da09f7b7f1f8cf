"""One concurrency level of a bench run: N trajectories, each making its calls back to back.

Every trajectory first makes one untimed call (the executor leases it a slot then, as a
trainer's first call does); once all have, the timed window opens. Each trajectory then goes
round the mix until the window's end (``duration_s``) or its own count of calls
(``calls``), and the level's figures are the calls made over the time from the window's
opening to the last answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from atropos_agent.bench.mix import SHELL, ToolMix
from atropos_agent.bench.targets import Target


@dataclass(frozen=True)
class Budget:
    """How long each trajectory goes on: seconds of the window, or calls of its own."""

    duration_s: float | None = None
    calls: int | None = None

    def __post_init__(self) -> None:
        if (self.duration_s is None) == (self.calls is None):
            raise ValueError("a budget is a duration or a count of calls, exactly one")


@dataclass
class LevelSamples:
    """What one level measured: the latency of every timed call by its label, failures by
    error kind (those of the untimed first calls included), and the window's length."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    errors_by_label: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    calls: int = 0
    # When the timed window opened (time.monotonic()), None before.
    opened_at: float | None = None

    def add(self, label: str, seconds: float, error_kind: str | None) -> None:
        self.calls += 1
        self.latencies.setdefault(label, []).append(seconds)
        if error_kind is not None:
            self.errors[error_kind] += 1
            self.errors_by_label[label] += 1


class Level:
    """One level against one target; ``samples`` fill as it runs (for a progress display)."""

    def __init__(self, target: Target, mix: ToolMix, concurrency: int, budget: Budget) -> None:
        self.target = target
        self.mix = mix
        self.concurrency = concurrency
        self.budget = budget
        self.samples = LevelSamples()
        self.leased = 0

    async def run(self) -> LevelSamples:
        self.target.start_level(self.concurrency)
        window = asyncio.Event()
        deadline: list[float] = []  # set when the window opens
        first = [asyncio.ensure_future(self._first_call(n)) for n in range(self.concurrency)]
        loops = [
            asyncio.ensure_future(self._trajectory(n, window, deadline))
            for n in range(self.concurrency)
        ]
        try:
            await asyncio.gather(*first)
            opened = time.monotonic()
            if self.budget.duration_s is not None:
                deadline.append(opened + self.budget.duration_s)
            self.samples.opened_at = opened
            window.set()
            await asyncio.gather(*loops)
            self.samples.elapsed_s = time.monotonic() - opened
        finally:
            for task in (*first, *loops):
                task.cancel()
            await asyncio.gather(*first, *loops, return_exceptions=True)
            await self.target.end_level()
        return self.samples

    async def _first_call(self, trajectory: int) -> None:
        error_kind = await self.target.call(trajectory, SHELL)
        if error_kind is not None:
            self.samples.errors[error_kind] += 1
        self.leased += 1

    async def _trajectory(
        self, trajectory: int, window: asyncio.Event, deadline: list[float]
    ) -> None:
        await window.wait()
        sequence = self.mix.sequence
        position = trajectory % len(sequence)
        made = 0
        add, call, clock = self.samples.add, self.target.call, time.perf_counter
        while True:
            if self.budget.calls is not None and made >= self.budget.calls:
                return
            if deadline and time.monotonic() >= deadline[0]:
                return
            step = sequence[position]
            position = (position + 1) % len(sequence)
            started = clock()
            error_kind = await call(trajectory, step)
            add(step.label, clock() - started, error_kind)
            made += 1
