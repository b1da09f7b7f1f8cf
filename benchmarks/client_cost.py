"""What the trainer-side client costs the trainer: CPU seconds per call and its latency tail.

    python -m benchmarks.client_cost [--concurrency 64 256] [--calls 8] [--repeats 3]
                                     [--kinds aiohttp async sync httpx] [--json out.json]

Starts one executor (local backend, four sandboxes of 64 slots, room for 256 trajectories),
then, for each concurrency and each kind of client, runs a client in a process of its own:
``--concurrency`` trajectories at once, each ``--calls`` sequential ``echo hi`` calls through
``execute`` and a release. The client process reads its own CPU (user + system, all its
threads, from ``getrusage``) around the measured round only: the executor's CPU, and the
client's start-up and warm-up round, do not count. Kinds:

- ``aiohttp``: the baseline, a plain ``aiohttp.ClientSession`` posting the same JSON;
- ``async``: the project's ``AsyncExecutorClient``, one event loop;
- ``sync``: the project's ``ExecutorClient``, shared by one thread per trajectory;
- ``httpx``: ``httpx.AsyncClient`` with the settings of the client before this one (pool
  limits left at httpx's defaults, idle connections kept 4 s), for comparison.

Each figure is the median over ``--repeats`` runs (kinds interleaved, so that a busy moment of
the machine falls on all alike), with its spread (min..max) as the noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import QUIET, machine_summary
from harness.servers import ExecutorServer, start_executor

KINDS = ("aiohttp", "async", "sync", "httpx")
TARGET_CPU_MS = 0.5
TARGET_TAIL_RATIO = 2.0


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ---- the client process: one kind, one concurrency, its own CPU


def tool(call: int) -> dict[str, Any]:
    return {"name": "terminal", "arguments": {"command": "echo hi"}, "uniq_id": f"c{call}"}


async def run_async(
    execute: Callable[[str, int], Awaitable[None]],
    release: Callable[[str], Awaitable[None]],
    trajectories: int,
    calls: int,
    tag: str,
    latencies: list[float],
) -> int:
    async def trajectory(number: int) -> None:
        trajectory_id = f"{tag}-{number}"
        for call in range(calls):
            started = time.perf_counter()
            await execute(trajectory_id, call)
            latencies.append(time.perf_counter() - started)
        await release(trajectory_id)

    await asyncio.gather(*(trajectory(n) for n in range(trajectories)))
    return trajectories * (calls + 1)


async def async_kind(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.token}"}
    failed = [0]
    closers: list[Callable[[], Awaitable[None]]] = []
    execute: Callable[[str, int], Awaitable[None]]
    release: Callable[[str], Awaitable[None]]
    if kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            args.url, headers=headers, connector=aiohttp.TCPConnector(limit=0)
        )
        closers.append(session.close)

        async def post(path: str, body: dict[str, Any]) -> Any:
            async with session.post(path, json=body) as response:
                return await response.json()

        async def execute(trajectory_id: str, call: int) -> None:
            answer = await post("/execute", {"trajectory_id": trajectory_id, "tool": tool(call)})
            failed[0] += not answer.get("success")

        async def release(trajectory_id: str) -> None:
            await post("/release", {"trajectory_id": trajectory_id})

    elif kind == "httpx":
        import httpx

        http = httpx.AsyncClient(
            base_url=args.url,
            headers=headers,
            timeout=httpx.Timeout(30.0, read=900),
            limits=httpx.Limits(keepalive_expiry=4.0),
        )
        closers.append(http.aclose)

        async def execute(trajectory_id: str, call: int) -> None:
            body = {"trajectory_id": trajectory_id, "tool": tool(call)}
            answer = (await http.post("/execute", json=body)).json()
            failed[0] += not answer.get("success")

        async def release(trajectory_id: str) -> None:
            await http.post("/release", json={"trajectory_id": trajectory_id})

    else:
        from atropos_agent.client import AsyncExecutorClient, ExecutorError

        client = AsyncExecutorClient(args.url, token=args.token)
        closers.append(client.close)

        async def execute(trajectory_id: str, call: int) -> None:
            try:
                result = await client.execute(
                    trajectory_id, "terminal", {"command": "echo hi"}, uniq_id=f"c{call}"
                )
                failed[0] += not result.success
            except ExecutorError:
                failed[0] += 1

        async def release(trajectory_id: str) -> None:
            with contextlib.suppress(ExecutorError):
                await client.release(trajectory_id)

    try:
        await run_async(execute, release, args.concurrency, 2, "warm", [])
        failed[0] = 0
        latencies: list[float] = []
        before, started = cpu_now(), time.perf_counter()
        requests = await run_async(
            execute, release, args.concurrency, args.calls, "measured", latencies
        )
        figures = summary(cpu_now() - before, time.perf_counter() - started, requests, latencies)
        return {**figures, "failed_results": failed[0]}
    finally:
        for close in closers:
            await close()


def sync_kind(args: argparse.Namespace) -> dict[str, Any]:
    from atropos_agent.client import ExecutorClient, ExecutorError

    failed = [0]

    def round_of(client: ExecutorClient, calls: int, tag: str, latencies: list[float]) -> int:
        def trajectory(number: int) -> None:
            trajectory_id = f"{tag}-{number}"
            for call in range(calls):
                started = time.perf_counter()
                try:
                    result = client.execute(
                        trajectory_id, "terminal", {"command": "echo hi"}, uniq_id=f"c{call}"
                    )
                    failed[0] += not result.success
                except ExecutorError:
                    failed[0] += 1
                latencies.append(time.perf_counter() - started)
            with contextlib.suppress(ExecutorError):
                client.release(trajectory_id)

        threads = [threading.Thread(target=trajectory, args=(n,)) for n in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        requests: int = args.concurrency * (calls + 1)
        return requests

    with ExecutorClient(args.url, token=args.token) as client:
        round_of(client, 2, "warm", [])
        failed[0] = 0
        latencies: list[float] = []
        before, started = cpu_now(), time.perf_counter()
        requests = round_of(client, args.calls, "measured", latencies)
        figures = summary(cpu_now() - before, time.perf_counter() - started, requests, latencies)
        return {**figures, "failed_results": failed[0]}


def summary(cpu_s: float, wall_s: float, requests: int, latencies: list[float]) -> dict[str, Any]:
    return {
        "cpu_ms_per_call": cpu_s / requests * 1000,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "calls_per_s": requests / wall_s,
    }


def child(args: argparse.Namespace) -> None:
    sync = args.child == "sync"
    figures = sync_kind(args) if sync else asyncio.run(async_kind(args.child, args))
    print(json.dumps(figures))


# ---- the parent: one executor, the clients in turn


def run_client(kind: str, url: str, token: str, concurrency: int, calls: int) -> dict[str, Any]:
    argv = [
        *(sys.executable, "-m", "benchmarks.client_cost", "--child", kind),
        *("--url", url, "--token", token),
        *("--concurrency", str(concurrency), "--calls", str(calls)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} client failed:\n{done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in runs[0]:
        values = [run[key] for run in runs]
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_range"] = [round(min(values), 3), round(max(values), 3)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--json", help="also write the figures to this file")
    # The client process (internal).
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.concurrency = args.concurrency[0]
        child(args)
        return

    env = {
        "TOOL_EXECUTOR_SLOTS": "64",
        "TOOL_EXECUTOR_MIN_CONTAINERS": "4",
        "TOOL_EXECUTOR_MAX_CONTAINERS": "4",
        # Every slot kept warm: a trajectory's first call then costs what a later one does,
        # and the tail measured is the clients', not that of slots starting on demand.
        "TOOL_EXECUTOR_WARM_SLOTS": "64",
        "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S": "240",
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
        # The pool's warm counts come with each health check: often, to see them settle.
        "TOOL_EXECUTOR_HEALTH_INTERVAL_S": "1",
    }
    started = time.monotonic()
    server = start_executor(env=env, defaults={}, args=QUIET, timeout_s=300)
    results: dict[str, dict[str, Any]] = {}
    try:
        assert server.token is not None
        settle(server)
        for concurrency in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}
            for _ in range(args.repeats):
                for kind in args.kinds:
                    runs[kind].append(
                        run_client(kind, server.url, server.token, concurrency, args.calls)
                    )
                    settle(server)
            for kind, kind_runs in runs.items():
                results[f"{kind}@{concurrency}"] = median_of(kind_runs)
    finally:
        server.stop()
    report(results, args, time.monotonic() - started)


def settle(server: ExecutorServer, timeout_s: float = 120.0) -> None:
    """Wait until every slot is free and warm again (released slots are reset, then warmed,
    in the background): each run starts from the same pool, and its tail is the client's."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool = server.status()["pool"]
        warm = pool["slots_by_readiness"]["warm"]
        if pool["free_slots"] == pool["total_slots"] and warm == pool["total_slots"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the pool did not settle (every slot free and warm) within {timeout_s:g} s")


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    print(f"machine: {machine_summary()}")
    print(f"{args.calls} calls per trajectory, medians of {args.repeats} runs (min..max)")
    header = f"{'client':<14}{'CPU ms/call':>24}{'p50 ms':>10}{'p99 ms':>10}{'p99/p50':>9}"
    print(header + f"{'calls/s':>10}{'failed':>8}  vs aiohttp")
    for name, figures in results.items():
        concurrency = name.split("@")[1]
        baseline = results.get(f"aiohttp@{concurrency}")
        low, high = figures["cpu_ms_per_call_range"]
        ratio = figures["cpu_ms_per_call"] / baseline["cpu_ms_per_call"] if baseline else 0
        tail = figures["p99_ms"] / figures["p50_ms"]
        print(
            f"{name:<14}{figures['cpu_ms_per_call']:>8.3f} ({low:.3f}..{high:.3f})"
            f"{figures['p50_ms']:>10.1f}{figures['p99_ms']:>10.1f}{tail:>9.2f}"
            f"{figures['calls_per_s']:>10.0f}{figures['failed_results']:>8.0f}  {ratio:.2f}x"
        )
    print(
        f"targets: project client <= {TARGET_CPU_MS} ms CPU per call at 256, "
        f"p99 <= {TARGET_TAIL_RATIO:g}x p50"
    )
    if args.json:
        document = {
            "benchmark": "client_cost",
            "machine": machine_summary(),
            "calls_per_trajectory": args.calls,
            "repeats": args.repeats,
            "results": results,
            "seconds": round(seconds, 1),
        }
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)


if __name__ == "__main__":
    main()
