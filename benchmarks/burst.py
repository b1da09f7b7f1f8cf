"""Bursts of new trajectories, throughput as trajectories grow, and large pools that start fast.

    python -m benchmarks.burst [--sandboxes 8] [--slots 128] [--bursts 256,1024]
                               [--levels 64,256,1024] [--calls 6] [--rounds 3]

In one run, on the local backend, with an aiohttp load client in this process (as a trainer
would drive the service; ``echo hi`` through ``POST /execute``):

1. **Pool start**: an executor with ``--sandboxes`` x ``--slots`` slots; seconds from its start
   until ``/health`` answers 200 with every sandbox in the pool.
2. For warm slots **on** (``TOOL_EXECUTOR_WARM_SLOTS`` = ``--slots``: every slot kept ready)
   and **off** (0: each slot starts on its first call), an executor with that pool:
   - **bursts**: N new trajectories send their first call at once (on connections the
     client already holds, as a running trainer's does): seconds until the last
     first answer, and the first calls' p50; then each makes ``--calls`` more calls, whose
     p50 is the steady state. Released, then the pool is let settle (free and warm again).
   - **throughput**: calls/s of L concurrent trajectories (each already holding its slot)
     making ``--calls`` calls each, for each level L.
3. **Full path against the machine's limit**: calls/s of 64 trajectories through the service
   (warm on) against a plain ``bash -c 'echo hi'`` spawn loop on one worker per core
   (``atropos_agent.bench.spawn_loop``), the same seconds each, alternating ``--rounds``
   times; the ratio of the medians.

Prints a JSON report with the targets beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from atropos_agent.bench.spawn_loop import run_spawn_loop
from benchmarks.common import QUIET, JsonClient, machine_summary
from harness.servers import ExecutorServer, start_executor

COMMAND = "echo hi"
TOKEN = "bench-token"
SETTLE_TIMEOUT_S = 180.0
TARGETS = {
    "pool_healthy_s": 10.0,
    "first_call_p50_over_steady_p50": 1.2,
    "throughput_at_1024_over_64": 0.8,
    "burst_1024_all_answered_s": 1.5,
    "full_path_over_spawn_loop_at_64": 0.65,
}


def start(sandboxes: int, slots: int, warm: int, wait: bool = True) -> ExecutorServer:
    settings = {
        "TOOL_EXECUTOR_SLOTS": str(slots),
        "TOOL_EXECUTOR_MIN_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_MAX_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_WARM_SLOTS": str(warm),
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
        # A sandbox whose slots all start at once on two busy cores may need longer than the
        # default to answer its first health check; the figure measured is the real time.
        "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S": "300",
        # The pool's warm counts come with each health check: often, to see them settle.
        "TOOL_EXECUTOR_HEALTH_INTERVAL_S": "1",
    }
    return start_executor(
        env=settings,
        defaults={},
        token=TOKEN,
        backend="local",
        args=QUIET,
        wait=wait,
        timeout_s=SETTLE_TIMEOUT_S,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def pool_start_seconds(sandboxes: int, slots: int, warm: int) -> float:
    """Seconds from the executor's start until it is healthy with every sandbox in its pool."""
    started = time.monotonic()
    server = start(sandboxes, slots, warm, wait=False)
    try:
        client = JsonClient(server.url, TOKEN)
        try:
            while time.monotonic() - started < SETTLE_TIMEOUT_S:
                if server.process.poll() is not None:
                    raise RuntimeError(f"the executor exited:\n{server.log()}")
                try:
                    status = await client.get("/status")
                    async with client.session.get("/health") as health:
                        healthy = health.status == 200
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                if healthy and len(status["pool"]["per_sandbox"]) >= sandboxes:
                    return time.monotonic() - started
                await asyncio.sleep(0.05)
            raise TimeoutError(f"the pool was not healthy within {SETTLE_TIMEOUT_S:g} s")
        finally:
            await client.close()
    finally:
        server.stop(timeout_s=120)


async def call(client: JsonClient, trajectory_id: str, uniq_id: str) -> float:
    """One ``echo hi`` call; its latency in seconds."""
    tool = {"name": "terminal", "arguments": {"command": COMMAND}, "uniq_id": uniq_id}
    started = time.perf_counter()
    result = await client.post("/execute", {"trajectory_id": trajectory_id, "tool": tool})
    latency = time.perf_counter() - started
    assert result.get("success") and result.get("output", "").strip() == "hi", result
    return latency


async def settle(client: JsonClient, warm: int) -> None:
    """Every slot free again (released slots are reset in the background) and, with warm
    slots on, as many warm as asked: what a burst starts from."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        pool = (await client.get("/status"))["pool"]
        free = pool["free_slots"] == pool["total_slots"]
        # As the sandboxes last reported them: the health interval is short here.
        warm_now = pool["slots_by_readiness"]["warm"]
        ready = warm_now >= min(warm * len(pool["per_sandbox"]), pool["total_slots"])
        if free and ready:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the pool did not settle (free and warm) within the timeout")


async def release_all(client: JsonClient, ids: list[str]) -> None:
    await asyncio.gather(*(client.post("/release", {"trajectory_id": t}) for t in ids))


async def burst(client: JsonClient, size: int, calls: int, tag: str) -> dict[str, float]:
    """``size`` new trajectories at once: their first answers, then their steady state."""
    ids = [f"{tag}-{n}" for n in range(size)]
    started = time.perf_counter()
    firsts = await asyncio.gather(*(call(client, t, "0") for t in ids))
    all_answered = time.perf_counter() - started

    async def rest(trajectory_id: str) -> list[float]:
        return [await call(client, trajectory_id, str(k)) for k in range(1, calls + 1)]

    steady = [
        latency for latencies in await asyncio.gather(*map(rest, ids)) for latency in latencies
    ]
    await release_all(client, ids)
    first_p50 = statistics.median(firsts)
    steady_p50 = statistics.median(steady)
    return {
        "all_answered_s": round(all_answered, 3),
        "first_call_p50_ms": round(first_p50 * 1000, 1),
        "steady_p50_ms": round(steady_p50 * 1000, 1),
        "first_over_steady": round(first_p50 / steady_p50, 2),
    }


async def throughput(client: JsonClient, level: int, calls: int, tag: str) -> float:
    """Calls/s of ``level`` trajectories that already hold their slots."""
    ids = [f"{tag}-{n}" for n in range(level)]
    await asyncio.gather(*(call(client, t, "0") for t in ids))

    async def rest(trajectory_id: str) -> None:
        for k in range(1, calls + 1):
            await call(client, trajectory_id, str(k))

    started = time.perf_counter()
    await asyncio.gather(*map(rest, ids))
    rate = level * calls / (time.perf_counter() - started)
    await release_all(client, ids)
    return rate


async def full_path_rate(client: JsonClient, trajectories: int, seconds: float, tag: str) -> float:
    """Calls/s of ``trajectories`` calling back to back for ``seconds`` (first calls excluded)."""
    ids = [f"{tag}-{n}" for n in range(trajectories)]
    await asyncio.gather(*(call(client, t, "0") for t in ids))
    done = 0
    end = time.perf_counter() + seconds

    async def loop(trajectory_id: str) -> None:
        nonlocal done
        k = 1
        while time.perf_counter() < end:
            await call(client, trajectory_id, str(k))
            k += 1
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*map(loop, ids))
    rate = done / (time.perf_counter() - started)
    await release_all(client, ids)
    return rate


async def open_connections(client: JsonClient, count: int) -> None:
    """``count`` connections opened and kept (``GET /health`` at once): a trainer's client
    that has been running holds its connections, and a burst of new trajectories is not a
    burst of new connections."""
    await asyncio.gather(*(client.get("/health") for _ in range(count)))


async def warm_case(args: argparse.Namespace, warm: int) -> dict[str, Any]:
    server = start(args.sandboxes, args.slots, warm)
    client = JsonClient(server.url, TOKEN)
    try:
        await open_connections(client, max([*args.bursts, *args.levels]))
        await settle(client, warm)
        bursts: dict[str, list[dict[str, float]]] = {str(size): [] for size in args.bursts}
        rates: dict[str, list[float]] = {str(level): [] for level in args.levels}
        for round_number in range(args.rounds):
            for size in args.bursts:
                tag = f"w{warm}-b{size}-r{round_number}"
                bursts[str(size)].append(await burst(client, size, args.calls, tag))
                await settle(client, warm)
            for level in args.levels:
                tag = f"w{warm}-l{level}-r{round_number}"
                rates[str(level)].append(await throughput(client, level, args.calls, tag))
                await settle(client, warm)
        spawn_ratios: list[dict[str, float]] = []
        if warm and args.compare_seconds > 0:
            for round_number in range(args.rounds):
                service = await full_path_rate(client, 64, args.compare_seconds, f"f{round_number}")
                await settle(client, warm)
                spawn = (await run_spawn_loop(args.compare_seconds)).calls_per_s
                spawn_ratios.append({"service": service, "spawn_loop": spawn})
    finally:
        await client.close()
        server.stop(timeout_s=120)
    report: dict[str, Any] = {
        "warm_slots_per_sandbox": warm,
        "bursts": {size: median_of(runs) for size, runs in bursts.items()},
        "bursts_rounds": bursts,
        "calls_per_s": {level: round(statistics.median(r), 1) for level, r in rates.items()},
        "calls_per_s_rounds": {level: [round(x, 1) for x in r] for level, r in rates.items()},
    }
    if spawn_ratios:
        service = statistics.median(r["service"] for r in spawn_ratios)
        spawn = statistics.median(r["spawn_loop"] for r in spawn_ratios)
        report["full_path_at_64"] = {
            "service_calls_per_s": round(service, 1),
            "spawn_loop_calls_per_s": round(spawn, 1),
            "ratio": round(service / spawn, 3),
        }
    return report


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandboxes", type=int, default=8)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--bursts", type=numbers, default=[256, 1024])
    parser.add_argument("--levels", type=numbers, default=[64, 256, 1024])
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-seconds", type=float, default=6.0)
    args = parser.parse_args()

    pool_start = [
        await pool_start_seconds(args.sandboxes, args.slots, args.slots) for _ in range(2)
    ]
    warm_on = await warm_case(args, args.slots)
    warm_off = await warm_case(args, 0)
    on_rates = warm_on["calls_per_s"]
    top, bottom = str(max(args.levels)), str(min(args.levels))
    largest = str(max(args.bursts))
    figures = {
        "pool_healthy_s": round(statistics.median(pool_start), 2),
        "first_call_p50_over_steady_p50": warm_on["bursts"][largest]["first_over_steady"],
        "throughput_at_1024_over_64": round(on_rates[top] / on_rates[bottom], 3),
        "burst_1024_all_answered_s": warm_on["bursts"][largest]["all_answered_s"],
        "full_path_over_spawn_loop_at_64": warm_on.get("full_path_at_64", {}).get("ratio"),
    }
    report = {
        "benchmark": "burst",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.burst", *sys.argv[1:]]),
        "pool": f"{args.sandboxes} x {args.slots} slots",
        "pool_healthy_s_runs": [round(s, 2) for s in pool_start],
        "warm_on": warm_on,
        "warm_off": warm_off,
        "figures": figures,
        "targets": TARGETS,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
