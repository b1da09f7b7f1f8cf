"""Executor memory with 1,024 leased trajectories.

    python -m benchmarks.executor_memory [--trajectories 1024] [--slots 128]

Starts an executor (local backend) with enough slots, leases every trajectory with one
trivial call, and reads the executor process's own resident memory (RSS, and PSS from
/proc/PID/smaps_rollup) before and after. The sandboxes' memory is not the executor's and is
not counted (see benchmarks.slot_memory for a slot's cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time

import httpx

from benchmarks.common import QUIET, machine_summary
from benchmarks.slot_memory import smaps
from harness.servers import start_executor

TOKEN = "bench-token"
MIB = 1024 * 1024


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trajectories", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=128)
    args = parser.parse_args()
    sandboxes = math.ceil(args.trajectories / args.slots)
    settings = {
        "TOOL_EXECUTOR_SLOTS": str(args.slots),
        "TOOL_EXECUTOR_MIN_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_MAX_CONTAINERS": str(sandboxes),
        "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S": "600",
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "300",
    }
    server = start_executor(
        env=settings, defaults={}, token=TOKEN, backend="local", args=QUIET, timeout_s=900
    )
    try:
        before = smaps(server.process.pid)
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(
            base_url=server.url,
            timeout=300,
            headers={"Authorization": f"Bearer {TOKEN}"},
            limits=limits,
        ) as client:
            gate = asyncio.Semaphore(256)

            async def lease(number: int) -> None:
                async with gate:
                    body = {
                        "trajectory_id": f"held-{number}",
                        "tool": {"name": "terminal", "arguments": {"command": "true"}},
                    }
                    result = (await client.post("/execute", json=body)).json()
                    assert result["success"], result

            started = time.perf_counter()
            await asyncio.gather(*(lease(n) for n in range(args.trajectories)))
            leased_in = time.perf_counter() - started
            status = (await client.get("/status")).json()
            assert status["leases"] == args.trajectories, status["leases"]
        after = smaps(server.process.pid)
    finally:
        server.stop(timeout_s=120)
    report = {
        "benchmark": "executor_memory",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.executor_memory", *sys.argv[1:]]),
        "trajectories_leased": args.trajectories,
        "sandboxes": sandboxes,
        "slots_per_sandbox": args.slots,
        "executor_rss_mib": {
            "before": round(before["Rss"] / MIB, 1),
            "after": round(after["Rss"] / MIB, 1),
        },
        "executor_pss_mib": {
            "before": round(before["Pss"] / MIB, 1),
            "after": round(after["Pss"] / MIB, 1),
        },
        "target_mib": 200,
        "seconds_to_lease_all": round(leased_in, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
