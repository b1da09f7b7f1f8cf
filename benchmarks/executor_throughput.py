"""Executor throughput and latency against the sandbox servers driven directly, in the same run.

    python -m benchmarks.executor_throughput [--trajectories 256] [--calls 8] [--rounds 3]

Starts an executor (local backend, sandboxes of --slots slots, enough of them for every
trajectory) and, beside it, the same number of sandbox servers started directly. Each round:

- executor: N concurrent trajectories, each making --calls sequential ``echo hi`` calls
  through ``POST /execute``;
- direct: N concurrent clients, each bound to one slot of the direct sandboxes, making the
  same calls through the sandbox's own ``POST /execute``.

Rounds alternate; medians are reported. Then the p50 of a lone call on the idle executor
against the p50 of the same lone call sent directly to a sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
import uuid
from collections.abc import Mapping

from benchmarks.common import QUIET, JsonClient, machine_summary
from harness.servers import ServerProcess, start_executor, start_sandbox, wait_until_healthy

COMMAND = "echo hi"
TOKEN = "bench-token"


def executor_settings(slots: int, sandboxes: int) -> dict[str, str]:
    return {
        "TOOL_EXECUTOR_SLOTS": str(slots),
        "TOOL_EXECUTOR_MIN_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_MAX_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
    }


async def executor_round(client: JsonClient, trajectories: int, calls: int, tag: str) -> float:
    async def trajectory(number: int) -> None:
        for call in range(calls):
            # Each call with an id of its own, as trainers send them (and as retries need).
            tool = {"name": "terminal", "arguments": {"command": COMMAND}, "uniq_id": str(call)}
            body = {"trajectory_id": f"{tag}-{number}", "tool": tool}
            result = await client.post("/execute", body)
            assert result["success"] and result["output"].strip() == "hi", result

    started = time.perf_counter()
    await asyncio.gather(*(trajectory(n) for n in range(trajectories)))
    elapsed = time.perf_counter() - started
    await asyncio.gather(
        *(client.post("/release", {"trajectory_id": f"{tag}-{n}"}) for n in range(trajectories))
    )
    await wait_pool_idle(client)
    return trajectories * calls / elapsed


async def wait_pool_idle(client: JsonClient) -> None:
    """Released slots are reset in the background: let that finish before measuring more."""
    for _ in range(600):
        pool = (await client.get("/status"))["pool"]
        if pool["free_slots"] == pool["total_slots"]:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the executor's slots were not all free again within 60 s")


async def direct_round(
    clients: list[JsonClient], slots: int, trajectories: int, calls: int
) -> float:
    round_id = uuid.uuid4().hex[:8]  # slots answer a repeated id from memory: never repeat

    async def trajectory(number: int) -> None:
        client = clients[number // slots]
        for call in range(calls):
            item = {
                "slot_id": f"slot_{number % slots}",
                "tool": "terminal",
                "args": {"command": COMMAND},
                "execution_id": f"{round_id}-{number}-{call}",
            }
            result = await client.post("/execute", item)
            assert result["success"] and result["output"].strip() == "hi", result

    started = time.perf_counter()
    await asyncio.gather(*(trajectory(n) for n in range(trajectories)))
    return trajectories * calls / (time.perf_counter() - started)


async def lone_call_p50(
    client: JsonClient, path: str, body: Mapping[str, object], samples: int
) -> float:
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        result = await client.post(path, body)
        timings.append((time.perf_counter() - started) * 1000)
        assert result["success"], result
    return statistics.median(timings)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    args = parser.parse_args()
    sandboxes = math.ceil(args.trajectories / args.slots)

    settings = executor_settings(args.slots, sandboxes)
    executor_server = start_executor(
        env=settings, defaults={}, token=TOKEN, backend="local", args=QUIET, wait=False
    )
    direct_servers = [
        start_sandbox(slots=args.slots, token=TOKEN, args=QUIET, wait=False)
        for _ in range(sandboxes)
    ]
    servers: list[ServerProcess] = [executor_server, *direct_servers]
    try:
        for server in servers:
            wait_until_healthy(server, 180)
        executor = JsonClient(executor_server.url, TOKEN)
        direct = [JsonClient(server.url, TOKEN) for server in direct_servers]
        # Warm-up: every trajectory leases once, every direct slot runs once.
        await executor_round(executor, args.trajectories, 1, "warm")
        await direct_round(direct, args.slots, args.trajectories, 1)

        lone_body = {
            "trajectory_id": "lone",
            "tool": {"name": "terminal", "arguments": {"command": COMMAND}},
        }
        lone_direct = {"slot_id": "slot_0", "tool": "terminal", "args": {"command": COMMAND}}
        executor_p50s, direct_p50s = [], []
        executor_rates, direct_rates = [], []
        for round_number in range(args.rounds):
            executor_p50s.append(
                await lone_call_p50(
                    executor, "/execute", lone_body, args.latency_samples // args.rounds
                )
            )
            direct_p50s.append(
                await lone_call_p50(
                    direct[0], "/execute", lone_direct, args.latency_samples // args.rounds
                )
            )
            # The lone trajectory gives its slot back before every trajectory needs one.
            await executor.post("/release", {"trajectory_id": "lone", "reset_workspace": True})
            executor_rates.append(
                await executor_round(executor, args.trajectories, args.calls, f"r{round_number}")
            )
            direct_rates.append(
                await direct_round(direct, args.slots, args.trajectories, args.calls)
            )
        await executor.close()
        for client in direct:
            await client.close()
    finally:
        for server in servers:
            server.stop(timeout_s=60)

    executor_median = statistics.median(executor_rates)
    direct_median = statistics.median(direct_rates)
    report = {
        "benchmark": "executor_throughput",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.executor_throughput", *sys.argv[1:]]),
        "trajectories": args.trajectories,
        "calls_per_trajectory": args.calls,
        "sandboxes": sandboxes,
        "slots_per_sandbox": args.slots,
        "executor_calls_per_s": [round(r, 1) for r in executor_rates],
        "direct_calls_per_s": [round(r, 1) for r in direct_rates],
        "throughput_ratio": round(executor_median / direct_median, 3),
        "target_throughput_ratio": 0.6,
        "lone_call_p50_ms": {
            "executor": round(statistics.median(executor_p50s), 3),
            "direct": round(statistics.median(direct_p50s), 3),
        },
        "lone_call_overhead_ms": round(
            statistics.median(executor_p50s) - statistics.median(direct_p50s), 3
        ),
        "target_overhead_ms": 3.0,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
