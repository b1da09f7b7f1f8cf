"""``atropos-tool-executor bench``: the command line, and the order of a run's phases.

With ``--url`` the bench loads that service; without, it starts one on the local backend
(``local_service.py``), its pool sized for the highest level, and stops it at the end. At
each level in turn: the ``bash -c`` spawn loop, the executor, then the sandbox servers driven
directly (the ones the bench started, or ``--sandbox-url``); each phase under a live progress
bar. Then the tables, ``--json`` and ``--plot``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import signal
import sys
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from rich.console import Console

from atropos_agent.bench import report as reports
from atropos_agent.bench.load import Budget, Level
from atropos_agent.bench.local_service import LocalService
from atropos_agent.bench.mix import ToolMix, parse_mix
from atropos_agent.bench.progress import RunProgress
from atropos_agent.bench.render import summary
from atropos_agent.bench.targets import CallFailed, ExecutorTarget, SandboxTarget, sandbox_slots
from atropos_agent.serving import raise_open_file_limit

T = TypeVar("T")
DEFAULT_LEVELS = "1,16,256"
DEFAULT_DURATION_S = 10.0
# The spawn loop's window when the levels are counted in calls rather than seconds.
SPAWN_WINDOW_S = 5.0
SECRET_FLAGS = ("--token", "--sandbox-token")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels are integers of at least 1")
    return levels


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="atropos-tool-executor bench",
        description="Load an executor service with concurrent trajectories, each making tool "
        "calls back to back, and report calls/s and latency per tool and level, failures by "
        "error kind, and the same run's baselines: sandbox servers driven directly and a "
        "plain `bash -c` spawn loop (one worker per core). Without --url it starts a service "
        "of its own on the local backend and stops it at the end. docs/benchmarks.md "
        "documents the JSON.",
    )
    parser.add_argument("--url", help="the executor to load (default: start one)")
    parser.add_argument(
        "--token",
        default=os.environ.get("TOOL_EXECUTOR_TOKEN"),
        help="its bearer token (default $TOOL_EXECUTOR_TOKEN)",
    )
    parser.add_argument(
        "--concurrency",
        type=parse_levels,
        default=parse_levels(DEFAULT_LEVELS),
        metavar="N,N,...",
        help=f"concurrent trajectories at each level (default {DEFAULT_LEVELS})",
    )
    parser.add_argument(
        "--mix",
        default="shell",
        help="calls each trajectory makes, with weights: shell (echo hi), python (a CPU-bound "
        "snippet), files (write_file then read_file), archive (the artifacts archive), e.g. "
        "shell=8,python=1,files=1,archive=1 (default shell)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds of calls at each level (default {DEFAULT_DURATION_S:g})",
    )
    budget.add_argument("--calls", type=int, default=None, help="calls per trajectory instead")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the report as JSON to FILE (no FILE: to stdout, the tables to stderr)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="draw the report (matplotlib)"
    )
    parser.add_argument(
        "--sandbox-url",
        action="append",
        default=[],
        help="a sandbox server to drive directly as the baseline (repeat for several); the "
        "bench's own service has its own",
    )
    parser.add_argument(
        "--sandbox-token",
        default=os.environ.get("ATROPOS_SANDBOX_TOKEN"),
        help="their bearer token (default $ATROPOS_SANDBOX_TOKEN)",
    )
    parser.add_argument(
        "--no-sandbox-baseline",
        action="store_true",
        help="do not start or drive sandbox servers directly",
    )
    parser.add_argument("--no-spawn-loop", action="store_true", help="skip the spawn loop")
    parser.add_argument(
        "--spawn-workers",
        type=int,
        default=None,
        help=f"spawn loop workers (default one per core: {os.cpu_count()})",
    )
    parser.add_argument(
        "--slots-per-sandbox",
        type=int,
        default=256,
        help="the bench's own service: slots per sandbox (default 256, fewer when the highest "
        "level needs fewer); it runs enough sandboxes for the highest level",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=900.0,
        help="the bench's own service: seconds it may take to start (default 900)",
    )
    args = parser.parse_args(argv)
    try:
        args.tool_mix = parse_mix(args.mix)
    except ValueError as exc:
        parser.error(str(exc))
    if args.duration is None and args.calls is None:
        args.duration = DEFAULT_DURATION_S
    if (args.duration is not None and args.duration <= 0) or (
        args.calls is not None and args.calls < 1
    ):
        parser.error("--duration must be positive and --calls at least 1")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install 'atropos-agent[plot]'")
    if args.slots_per_sandbox < 1:
        parser.error("--slots-per-sandbox must be at least 1")
    return args


def shown_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret flags hidden, for the report."""
    shown: list[str] = []
    hide_next = False
    for part in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif part in SECRET_FLAGS:
            shown.append(part)
            hide_next = True
        elif part.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            shown.append(part.split("=", 1)[0] + "=***")
        else:
            shown.append(part)
    return shown


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    # A thousand trajectories are a thousand connections: past the common soft limit.
    raise_open_file_limit()
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    service: LocalService | None = None
    report: dict[str, Any] | None = None
    try:
        url, token = args.url, args.token
        sandbox_urls, sandbox_token = list(args.sandbox_url), args.sandbox_token
        if url is None:
            service = start_service(args, console)
            url, token = service.url, service.token
            if service.baseline_servers:
                sandbox_urls, sandbox_token = service.baseline_urls, service.sandbox_token
        if args.no_sandbox_baseline:
            sandbox_urls = []
        report = reports.header(
            argv=shown_argv(argv),
            service=describe_service(url, token, service),
            mix=args.tool_mix.weights,
            duration_s=args.duration,
            calls=args.calls,
        )
        run_async(run(args, report, url, token, sandbox_urls, sandbox_token, console))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the levels measured so far follow[/]")
    except (RuntimeError, CallFailed, aiohttp.ClientError, OSError) as exc:
        sys.exit(f"atropos-tool-executor bench: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if service is not None:
            console.print("stopping the bench's service", style="dim")
            service.stop()
    if report is None or not report["levels"]:
        sys.exit(1)
    write_outputs(args, report, console)


def start_service(args: argparse.Namespace, console: Console) -> LocalService:
    highest = max(args.concurrency)
    slots = min(args.slots_per_sandbox, highest)
    sandboxes = math.ceil(highest / slots)
    service = LocalService(
        sandboxes=sandboxes,
        slots=slots,
        baseline=not args.no_sandbox_baseline,
        start_timeout_s=args.start_timeout,
    )
    twice = " (and as many driven directly, the baseline)" if service.baseline else ""
    console.print(
        f"starting an executor on the local backend: {sandboxes} sandboxes of {slots} slots{twice}",
        style="dim",
    )
    try:
        service.start()
    except BaseException:
        service.stop()
        raise
    assert service.start_s is not None
    baseline = f", the baseline's after {service.baseline_start_s:.1f} s more" if twice else ""
    console.print(f"the executor was healthy after {service.start_s:.1f} s{baseline}", style="dim")
    return service


def describe_service(url: str, token: str | None, service: LocalService | None) -> dict[str, Any]:
    """Where the load goes, and the pool as the service's /status tells it."""
    described: dict[str, Any] = {
        "url": url,
        "started_by_bench": service is not None,
        "start_s": round(service.start_s, 3) if service and service.start_s else None,
        "sandboxes": None,
        "slots_per_sandbox": None,
    }
    try:
        request = urllib.request.Request(url + "/status")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as answer:
            pool = json.load(answer)["pool"]
        described["sandboxes"] = pool.get("sandboxes")
        described["slots_per_sandbox"] = pool.get("slots_per_sandbox")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the figures stand without it
    return described


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """On uvloop when it is there (it comes with uvicorn[standard]): the load generator's own
    CPU is taken from the service under test, so it should spend as little as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def run(
    args: argparse.Namespace,
    report: dict[str, Any],
    url: str,
    token: str | None,
    sandbox_urls: list[str],
    sandbox_token: str | None,
    console: Console,
) -> None:
    mix: ToolMix = args.tool_mix
    budget = Budget(duration_s=args.duration if args.calls is None else None, calls=args.calls)
    executor = ExecutorTarget(url, token)
    direct = None
    if sandbox_urls:
        slots = await sandbox_slots(sandbox_urls[0], sandbox_token)
        direct = SandboxTarget(sandbox_urls, sandbox_token, slots)
        report["service"]["sandbox_baseline"] = {"servers": len(sandbox_urls), "slots": slots}
    else:
        report["service"]["sandbox_baseline"] = None
    try:
        with RunProgress(console) as progress:
            for concurrency in args.concurrency:
                # The spawn loop first: the executor's release ends a level with every slot
                # restarting (namespaces torn down and made anew), kernel work that would
                # slow the spawn loop if it came right after.
                spawned = None
                if not args.no_spawn_loop:
                    window = args.duration if args.calls is None else SPAWN_WINDOW_S
                    spawned = await progress.spawn_loop(window, args.spawn_workers)
                ours = await progress.level(Level(executor, mix, concurrency, budget), "executor")
                theirs = None
                if direct is not None:
                    level = Level(direct, mix, concurrency, budget)
                    theirs = await progress.level(level, "sandbox direct")
                report["levels"].append(reports.level(concurrency, ours, theirs, spawned))
    finally:
        await executor.close()
        if direct is not None:
            await direct.close()


def write_outputs(args: argparse.Namespace, report: dict[str, Any], console: Console) -> None:
    console.print(summary(report))
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"JSON: {args.json}", style="dim")
    if args.plot is not None:
        from atropos_agent.bench.plot import draw

        draw(report, args.plot)
        console.print(f"plot: {args.plot}", style="dim")
