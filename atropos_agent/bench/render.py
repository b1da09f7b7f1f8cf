"""A bench report (``report.py``'s JSON) as terminal tables: throughput and latency per level,
target and call label; the baselines and ratios; failures by error kind."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from atropos_agent.bench.mix import TRIVIAL

# "sandbox": the sandbox servers driven directly, without the executor.
TARGET_NAMES = {"executor": "executor", "sandbox": "sandbox"}


def figure(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def calls_table(report: dict[str, Any]) -> Table:
    table = Table(
        title="Calls by concurrent trajectories (N), path and tool; latency in ms",
        title_justify="left",
    )
    for name in ("N", "path", "tool", "calls", "calls/s", "p50", "p95", "p99", "errors"):
        table.add_column(name, justify="left" if name in ("path", "tool") else "right")
    for level in report["levels"]:
        first = True
        for target, name in TARGET_NAMES.items():
            phase = level[target]
            if phase is None:
                continue
            rows = list(phase["tools"].items())
            if len(rows) > 1:
                rows.append(("all", phase))
            for tool, figures in rows:
                latency = figures["latency_ms"]
                table.add_row(
                    str(level["concurrency"]) if first else "",
                    name,
                    tool,
                    f"{figures['calls']:,}",
                    figure(figures["calls_per_s"]),
                    figure(latency.get("p50"), 2),
                    figure(latency.get("p95"), 2),
                    figure(latency.get("p99"), 2),
                    Text(str(figures["errors"]), style="bold red" if figures["errors"] else ""),
                )
                first = False
        table.add_section()
    return table


def baselines_table(report: dict[str, Any]) -> Table:
    table = Table(
        title="Baselines of the same run, calls/s",
        title_justify="left",
        caption="sandbox: the sandbox servers driven directly; trivial: the executor's shell "
        "calls; spawn loop: bash -c, one worker per core",
        caption_justify="left",
    )
    for name in ("N", "executor", "sandbox", "ratio", "trivial", "spawn loop", "ratio"):
        table.add_column(name, justify="right")
    for level in report["levels"]:
        sandbox, spawn = level["sandbox"], level["spawn_loop"]
        trivial = level["executor"]["tools"].get(TRIVIAL)
        ratios = level["ratios"]
        table.add_row(
            str(level["concurrency"]),
            figure(level["executor"]["calls_per_s"]),
            figure(sandbox["calls_per_s"] if sandbox else None),
            figure(ratios["executor_to_sandbox"], 3),
            figure(trivial["calls_per_s"] if trivial else None),
            figure(spawn["calls_per_s"] if spawn else None),
            figure(ratios["trivial_to_spawn_loop"], 3),
        )
    return table


def errors_table(report: dict[str, Any]) -> Table | None:
    rows = [
        (level["concurrency"], TARGET_NAMES[target], kind, count)
        for level in report["levels"]
        for target in TARGET_NAMES
        if level[target] is not None
        for kind, count in level[target]["errors_by_kind"].items()
    ]
    if not rows:
        return None
    table = Table(title="Failed calls by error kind", title_justify="left")
    for name in ("N", "path", "error kind", "calls"):
        table.add_column(name, justify="right" if name in ("N", "calls") else "left")
    for concurrency, path, kind, count in rows:
        table.add_row(str(concurrency), path, kind, f"{count:,}", style="red")
    return table


def summary(report: dict[str, Any]) -> Group:
    service = report["service"]
    started = (
        f", started by the bench in {service['start_s']:.1f} s"
        if service.get("started_by_bench")
        else ""
    )
    pool = ""
    if service.get("sandboxes"):
        pool = f" ({service['sandboxes']} sandboxes of {service['slots_per_sandbox']} slots)"
    lines: list[Table | Text] = [
        Text(
            f"{service['url']}{pool}{started}; mix "
            + ",".join(f"{k}={v}" for k, v in report["mix"].items()),
            style="dim",
        ),
        calls_table(report),
        baselines_table(report),
    ]
    errors = errors_table(report)
    lines.append(errors if errors is not None else Text("No call failed.", style="green"))
    return Group(*lines)
