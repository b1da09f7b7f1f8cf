"""Time from a burst that exceeds free slots to the first new slot leased, on the Nomad backend.

    python -m benchmarks.nomad_scaleup [--rounds 3] [--burst 6]

The executor's pool runs on the Nomad API double (harness/nomad_double), which places
allocations at once and starts each sandbox as a local process (as raw_exec does). So the
figure is the executor's own share: noticing the waiting demand, the scale request, finding
the new allocation, its sandbox server starting, admitting it. The same run measures how long
one sandbox server takes to start on its own (the double's task start latency), and a real
Nomad adds its scheduling time on top (100 ms to 1 s per placement is typical).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from benchmarks.common import QUIET, JsonClient, machine_summary
from harness.servers import start_executor, start_nomad_double, start_sandbox, wait_until_healthy

TOKEN = "bench-token"
ACL = "bench-acl"
JOB = "atropos-sandbox-tool-executor"


def sandbox_start_seconds() -> float:
    """One sandbox server (2 slots) from process start to a healthy /health."""
    started = time.perf_counter()
    server = start_sandbox(slots=2, token=None, args=QUIET, timeout_s=60)
    try:
        return time.perf_counter() - started
    finally:
        server.stop()


async def burst(client: JsonClient, size: int, tag: str, known: set[str]) -> float:
    """Seconds until the first call served by a sandbox that did not exist before."""
    started = time.perf_counter()
    first_new: list[float] = []

    async def trajectory(number: int) -> None:
        body = {
            "trajectory_id": f"{tag}-{number}",
            "tool": {"name": "terminal", "arguments": {"command": "true"}},
        }
        result = await client.post("/execute", body)
        assert result["success"], result
        if result["metadata"]["sandbox_id"] not in known:
            first_new.append(time.perf_counter() - started)

    await asyncio.gather(*(trajectory(n) for n in range(size)))
    await asyncio.gather(
        *(client.post("/release", {"trajectory_id": f"{tag}-{n}"}) for n in range(size))
    )
    assert first_new, "no call was served by a new sandbox"
    return min(first_new)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=6)
    args = parser.parse_args()

    double = start_nomad_double(acl_token=ACL)
    # Beside these, harness.servers.nomad_settings: raw_exec tasks of this Python, 500 MHz, 512 MB.
    settings = {
        "TOOL_EXECUTOR_SLOTS": "2",
        "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
        "TOOL_EXECUTOR_MAX_CONTAINERS": str(1 + args.burst // 2),
        "TOOL_EXECUTOR_SCALE_DOWN_IDLE_S": "1",
        "TOOL_EXECUTOR_HEALTH_INTERVAL_S": "2",
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
    }
    executor = start_executor(
        env=settings,
        defaults={},
        token=TOKEN,
        backend="nomad",
        nomad=double,
        args=QUIET,
        wait=False,
    )
    client = JsonClient(executor.url, TOKEN)
    try:
        wait_until_healthy(executor, 120)
        firsts, solo = [], []
        for round_number in range(args.rounds):
            solo.append(sandbox_start_seconds())
            status = await client.get("/status")
            known = {s["sandbox_id"] for s in status["pool"]["per_sandbox"]}
            firsts.append(await burst(client, args.burst, f"r{round_number}", known))
            # Back to one sandbox before the next burst.
            for _ in range(300):
                if (
                    len(double.running(JOB)) == 1
                    and (await client.get("/status"))["pool"]["sandboxes"] == 1
                ):
                    break
                await asyncio.sleep(0.1)
    finally:
        await client.close()
        executor.stop(timeout_s=60)
        double.close()
    report = {
        "benchmark": "nomad_scaleup",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.nomad_scaleup", *sys.argv[1:]]),
        "burst_trajectories": args.burst,
        "free_slots_before_burst": 2,
        "health_interval_s": 2,
        "first_new_slot_leased_s": [round(s, 3) for s in firsts],
        "first_new_slot_leased_median_s": round(statistics.median(firsts), 3),
        "double_task_start_s (one sandbox server to healthy)": [round(s, 3) for s in solo],
        "double_task_start_median_s": round(statistics.median(solo), 3),
        "double_placement": "immediate (no scheduler delay)",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
