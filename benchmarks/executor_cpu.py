"""The executor's own CPU per call: what the service spends on one ``/execute``.

    python -m benchmarks.executor_cpu [--trajectories 64] [--calls 30] [--rounds 3]

Starts an executor (local backend, two sandboxes of 32 slots), runs --trajectories concurrent
trajectories of --calls sequential ``echo hi`` calls (each with its own ``uniq_id``, as trainers
send them), and divides the CPU time the executor process used (user + system, from /proc) by
the number of calls. The sandboxes' CPU is not counted: this is the hop the executor adds.
Less noisy than throughput on a shared machine, so it is the figure to compare two trees by
(run each, alternating, and compare medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from benchmarks.common import QUIET, JsonClient, machine_summary
from harness.servers import start_executor

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


async def load(client: JsonClient, trajectories: int, calls: int, tag: str) -> int:
    async def trajectory(number: int) -> None:
        for call in range(calls):
            tool = {"name": "terminal", "arguments": {"command": "echo hi"}, "uniq_id": str(call)}
            result = await client.post(
                "/execute", {"trajectory_id": f"{tag}-{number}", "tool": tool}
            )
            assert result["success"], result

    await asyncio.gather(*(trajectory(n) for n in range(trajectories)))
    await asyncio.gather(
        *(client.post("/release", {"trajectory_id": f"{tag}-{n}"}) for n in range(trajectories))
    )
    return trajectories * calls


async def measure(url: str, token: str | None, pid: int, args: argparse.Namespace) -> list[float]:
    client = JsonClient(url, token)
    try:
        await load(client, args.trajectories, 2, "warm")
        per_call = []
        for number in range(args.rounds):
            before = cpu_seconds(pid)
            calls = await load(client, args.trajectories, args.calls, f"r{number}")
            per_call.append((cpu_seconds(pid) - before) / calls * 1000)
            await asyncio.sleep(1)  # released slots reset in the background
        return per_call
    finally:
        await client.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {
        "TOOL_EXECUTOR_SLOTS": "32",
        "TOOL_EXECUTOR_MIN_CONTAINERS": "2",
        "TOOL_EXECUTOR_MAX_CONTAINERS": "2",
    }
    server = start_executor(env=env, defaults={}, args=QUIET)
    started = time.monotonic()
    try:
        per_call = asyncio.run(measure(server.url, server.token, server.process.pid, args))
    finally:
        server.stop()
    print(
        json.dumps(
            {
                "benchmark": "executor_cpu",
                "machine": machine_summary(),
                "command": "python -m benchmarks.executor_cpu "
                f"--trajectories {args.trajectories} --calls {args.calls} --rounds {args.rounds}",
                "executor_cpu_ms_per_call": [round(value, 3) for value in per_call],
                "median_ms": round(statistics.median(per_call), 3),
                "seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
