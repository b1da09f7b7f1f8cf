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
from collections.abc import Mapping
from pathlib import Path

from benchmarks.common import (
    JsonClient,
    bench_dir,
    free_port,
    machine_summary,
    start_executor_server,
    start_sandbox_server,
    wait_healthy,
)

COMMAND = "echo hi"
TOKEN = "bench-token"


def executor_settings(data_dir: Path, slots: int, sandboxes: int) -> dict[str, str]:
    return {
        "TOOL_EXECUTOR_TOKEN": TOKEN,
        "TOOL_EXECUTOR_SLOTS": str(slots),
        "TOOL_EXECUTOR_MIN_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_MAX_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_SANDBOX_DATA_DIR": str(data_dir / "pool"),
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
    }


async def executor_round(client: JsonClient, trajectories: int, calls: int, tag: str) -> float:
    async def trajectory(number: int) -> None:
        body = {
            "trajectory_id": f"{tag}-{number}",
            "tool": {"name": "terminal", "arguments": {"command": COMMAND}},
        }
        for _ in range(calls):
            result = await client.post("/execute", body)
            assert result["success"] and result["output"] == "hi\n", result

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
    async def trajectory(number: int) -> None:
        client = clients[number // slots]
        item = {
            "slot_id": f"slot_{number % slots}",
            "tool": "terminal",
            "args": {"command": COMMAND},
        }
        for _ in range(calls):
            result = await client.post("/execute", item)
            assert result["success"] and result["output"] == "hi\n", result

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

    data_dir = bench_dir()
    executor_port = free_port()
    direct_ports = [free_port() for _ in range(sandboxes)]
    settings = executor_settings(data_dir, args.slots, sandboxes)
    processes = [start_executor_server(executor_port, settings, data_dir / "executor.log")]
    processes += [
        start_sandbox_server(port, args.slots, data_dir / f"direct-{i}", TOKEN)
        for i, port in enumerate(direct_ports)
    ]
    try:
        await wait_healthy(f"http://127.0.0.1:{executor_port}/health", 180, processes[0])
        for port, process in zip(direct_ports, processes[1:], strict=True):
            await wait_healthy(f"http://127.0.0.1:{port}/health", 180, process)
        executor = JsonClient(f"http://127.0.0.1:{executor_port}", TOKEN)
        direct = [JsonClient(f"http://127.0.0.1:{port}", TOKEN) for port in direct_ports]
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
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)

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
