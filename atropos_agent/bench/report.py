"""The figures of a bench run as one JSON document; ``render`` and ``plot`` read only this.

Its fields are documented in docs/benchmarks.md ("The bench's JSON"). Latencies are in
milliseconds, rates in calls per second; a baseline not measured is ``null``.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

from atropos_agent import __version__
from atropos_agent.bench.load import LevelSamples
from atropos_agent.bench.mix import TRIVIAL
from atropos_agent.bench.spawn_loop import SpawnLoopResult

SCHEMA = 1


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank of ``ordered`` (sorted, not empty) at ``fraction``."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def latency_ms(samples: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of ``samples`` (seconds) in ms; {} when there are none."""
    if not samples:
        return {}
    ordered = sorted(samples)
    figures = {f"p{round(q * 100)}": percentile(ordered, q) for q in (0.5, 0.95, 0.99)}
    figures["max"] = ordered[-1]
    return {name: round(seconds * 1000, 3) for name, seconds in figures.items()}


def rate(calls: int, seconds: float) -> float:
    return round(calls / seconds, 1) if seconds > 0 else 0.0


def phase(samples: LevelSamples) -> dict[str, Any]:
    """One target's figures at one level."""
    tools = {
        label: {
            "calls": len(latencies),
            "calls_per_s": rate(len(latencies), samples.elapsed_s),
            "errors": samples.errors_by_label.get(label, 0),
            "latency_ms": latency_ms(latencies),
        }
        for label, latencies in samples.latencies.items()
    }
    every = [seconds for latencies in samples.latencies.values() for seconds in latencies]
    return {
        "calls": samples.calls,
        "errors": sum(samples.errors.values()),
        "elapsed_s": round(samples.elapsed_s, 3),
        "calls_per_s": rate(samples.calls, samples.elapsed_s),
        "latency_ms": latency_ms(every),
        "tools": tools,
        "errors_by_kind": dict(samples.errors.most_common()),
    }


def spawn_phase(result: SpawnLoopResult) -> dict[str, Any]:
    return {
        "workers": result.workers,
        "calls": result.calls,
        "errors": result.errors,
        "elapsed_s": round(result.elapsed_s, 3),
        "calls_per_s": round(result.calls_per_s, 1),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def level(
    concurrency: int,
    executor: LevelSamples,
    sandbox: LevelSamples | None,
    spawn: SpawnLoopResult | None,
) -> dict[str, Any]:
    """Everything measured at one concurrency level, and the ratios the bench is read by."""
    ours = phase(executor)
    direct = phase(sandbox) if sandbox is not None else None
    spawned = spawn_phase(spawn) if spawn is not None else None
    trivial = ours["tools"].get(TRIVIAL)
    return {
        "concurrency": concurrency,
        "executor": ours,
        "sandbox": direct,
        "spawn_loop": spawned,
        "ratios": {
            "executor_to_sandbox": ratio(
                ours["calls_per_s"], direct["calls_per_s"] if direct else None
            ),
            "trivial_to_spawn_loop": ratio(
                trivial["calls_per_s"] if trivial else None,
                spawned["calls_per_s"] if spawned else None,
            ),
        },
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                "",
            )
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def header(
    *,
    argv: list[str],
    service: dict[str, Any],
    mix: dict[str, int],
    duration_s: float | None,
    calls: int | None,
) -> dict[str, Any]:
    """What a run was: the command, the machine, the service and the load asked for."""
    return {
        "schema": SCHEMA,
        "bench": "atropos-tool-executor bench",
        "version": __version__,
        "command": " ".join(["atropos-tool-executor", "bench", *argv]),
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "service": service,
        "mix": mix,
        "duration_s": duration_s,
        "calls_per_trajectory": calls,
        "levels": [],
    }
