"""Sandbox server throughput against a fresh-bubblewrap-per-call baseline, in the same run.

    python -m benchmarks.sandbox_throughput [--slots 8] [--calls 2000] [--rounds 3]

Server: trivial commands (``echo hi``) through ``POST /batch`` with every slot busy (each batch
carries one call per slot, two batches in flight). Baseline: the same number of calls at the
same concurrency, each a fresh ``bwrap`` with the slots' exact isolation flags running the same
shell. Rounds alternate server and baseline; medians are reported. Also: p50/p99 latency of a
single ``POST /execute`` on an idle server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from atropos_agent.sandbox import uids
from atropos_agent.sandbox.isolation import SlotPaths, bwrap_prefix
from atropos_agent.sandbox.settings import SandboxSettings
from benchmarks.common import QUIET, machine_summary
from harness.servers import start_sandbox, temporary_dir

COMMAND = "echo hi"


async def server_round(client: httpx.AsyncClient, slots: int, calls: int) -> float:
    batches = calls // slots
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(batches):
        queue.put_nowait(number)
    items = [
        {"slot_id": f"slot_{i}", "tool": "terminal", "args": {"command": COMMAND}}
        for i in range(slots)
    ]

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            response = await client.post("/batch", json=items)
            results = response.json()
            assert all(r["success"] and r["output"].strip() == "hi" for r in results), results

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(2)))
    return batches * slots / (time.perf_counter() - started)


async def baseline_round(
    settings: SandboxSettings,
    paths: list[SlotPaths],
    slot_uids: list[int | None],
    runtime_dir: Path,
    calls: int,
) -> float:
    slots = len(paths)
    shell = settings.slot_shell()
    prefixes = [bwrap_prefix(settings, p, runtime_dir) for p in paths]
    remaining = [calls]

    async def worker(index: int) -> None:
        uid = slot_uids[index]
        while remaining[0] > 0:
            remaining[0] -= 1
            process = await asyncio.create_subprocess_exec(
                *prefixes[index],
                shell,
                "-c",
                COMMAND,
                stdout=asyncio.subprocess.PIPE,
                env={},
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
            )
            out, _ = await process.communicate()
            assert out == b"hi\n", out

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(slots)))
    return calls / (time.perf_counter() - started)


async def idle_latency(client: httpx.AsyncClient, samples: int) -> tuple[float, float]:
    timings = []
    item = {"slot_id": "slot_0", "tool": "terminal", "args": {"command": COMMAND}}
    for _ in range(samples):
        started = time.perf_counter()
        response = await client.post("/execute", json=item)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.json()["success"]
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.99) - 1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    args = parser.parse_args()

    token = "bench-token"
    server = start_sandbox(slots=args.slots, token=token, args=QUIET)
    try:
        with temporary_dir() as baseline:
            settings = SandboxSettings(slots=args.slots)
            # The baseline's sandboxes run as uids of their own, like the server's slots.
            claimed = uids.claim(settings.slot_uid_base, args.slots) if os.geteuid() == 0 else None
            slot_uids = [claimed.uid(i) if claimed else None for i in range(args.slots)]
            paths = []
            for index in range(args.slots):
                root = baseline / f"slot_{index}"
                paths.append(SlotPaths(root=root, workspace=root / "w", tmp=root / "t"))
                uid = slot_uids[index]
                for directory in (paths[-1].workspace, paths[-1].tmp):
                    directory.mkdir(parents=True)
                    if uid is not None:
                        os.chown(directory, uid, uid)
            runtime_dir = server.data_dir / "runtime"

            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(
                base_url=server.url, headers=headers, timeout=120
            ) as client:
                await server_round(client, args.slots, args.slots * 20)  # warm-up
                p50, p99 = await idle_latency(client, args.latency_samples)
                server_rates, baseline_rates = [], []
                for _ in range(args.rounds):
                    server_rates.append(await server_round(client, args.slots, args.calls))
                    baseline_rates.append(
                        await baseline_round(settings, paths, slot_uids, runtime_dir, args.calls)
                    )
    finally:
        server.stop()

    server_median = statistics.median(server_rates)
    baseline_median = statistics.median(baseline_rates)
    report = {
        "benchmark": "sandbox_throughput",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.sandbox_throughput", *sys.argv[1:]]),
        "slots": args.slots,
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "server_calls_per_s": [round(r, 1) for r in server_rates],
        "baseline_calls_per_s": [round(r, 1) for r in baseline_rates],
        "server_median_calls_per_s": round(server_median, 1),
        "baseline_median_calls_per_s": round(baseline_median, 1),
        "ratio": round(server_median / baseline_median, 2),
        "target_ratio": 2.5,
        "idle_latency_p50_ms": round(p50, 3),
        "idle_latency_p99_ms": round(p99, 3),
        "python": platform.python_version(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
