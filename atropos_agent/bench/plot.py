"""A bench report (``report.py``'s JSON) as a PNG: latency percentiles and throughput against
concurrency, with the same run's baselines. matplotlib is the optional extra ``plot``, loaded
only here, on the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atropos_agent.bench.mix import TRIVIAL


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def draw(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot, ticker
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'atropos-agent[plot]' (or matplotlib)"
        ) from None

    levels = report["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure, (latency, throughput) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=100)

    for percentile, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        values = [level["executor"]["latency_ms"].get(percentile) for level in levels]
        latency.plot(concurrency, values, style, label=f"executor {percentile}")
    if all(level["sandbox"] for level in levels):
        values = [level["sandbox"]["latency_ms"].get("p50") for level in levels]
        latency.plot(concurrency, values, "x-", color="grey", label="sandbox direct p50")
    latency.set_title("Latency per call")
    latency.set_ylabel("ms")

    executor = [level["executor"]["calls_per_s"] for level in levels]
    throughput.plot(concurrency, executor, "o-", label="executor, all calls")
    trivial = [level["executor"]["tools"].get(TRIVIAL, {}).get("calls_per_s") for level in levels]
    if len(levels[0]["executor"]["tools"]) > 1 and all(trivial):
        throughput.plot(concurrency, trivial, "o--", label="executor, trivial calls")
    if all(level["sandbox"] for level in levels):
        direct = [level["sandbox"]["calls_per_s"] for level in levels]
        throughput.plot(concurrency, direct, "x-", color="grey", label="sandbox direct")
    if all(level["spawn_loop"] for level in levels):
        spawn = [level["spawn_loop"]["calls_per_s"] for level in levels]
        workers = levels[0]["spawn_loop"]["workers"]
        throughput.plot(concurrency, spawn, "k:", label=f"bash -c spawn loop ({workers} workers)")
    throughput.set_title("Throughput")
    throughput.set_ylabel("calls/s")
    throughput.set_ylim(bottom=0)

    for axes in (latency, throughput):
        axes.set_xscale("log")
        axes.set_xticks(concurrency, [str(c) for c in concurrency])
        axes.minorticks_off()
        axes.set_xlabel("concurrent trajectories")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    latency.set_yscale("log")
    latency.yaxis.set_major_formatter(ticker.ScalarFormatter())
    machine = report["machine"]
    figure.suptitle(
        f"atropos-tool-executor bench, mix {','.join(f'{k}={v}' for k, v in report['mix'].items())}"
        f" — {machine['cpus']} cores, {machine['system']}",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
