"""``atropos-tool-executor status``: an executor's ``GET /status`` for people, in the terminal.

The pool (sandboxes, slots by state, trainers waiting for a slot), leases and calls in the
service, latency of recent calls and the latest failed calls by error kind; with ``--watch`` it
refreshes in place until Ctrl-C. The numbers are the service's own: this only lays them out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from atropos_agent.client import ExecutorClient, ExecutorError, ExecutorUnreachable

DEFAULT_URL = "http://127.0.0.1:9001"
DEFAULT_WATCH_S = 2.0
# A status read that takes longer than this is shown as unreachable, not waited for.
READ_TIMEOUT_S = 10.0
SLOT_STATES = ("available", "acquired", "executing", "releasing", "error")


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def overview(status: dict[str, Any], url: str) -> Text:
    pool = status.get("pool", {})
    backend = pool.get("backend", {}).get("backend", "?")
    errors = status.get("total_errors", 0)
    text = Text()
    text.append(f"{url}", style="bold")
    text.append(f"  backend {backend}  ")
    text.append(f"{count(status.get('total_requests'))} calls, ")
    text.append(f"{count(errors)} failed", style="red" if errors else "")
    text.append(
        f"  {count(status.get('queue_size'))} in the service (at most "
        f"{count(status.get('max_queue'))})  {count(status.get('leases'))} leases, "
        f"{count(status.get('trajectories'))} trajectories"
    )
    return text


def pool_table(pool: dict[str, Any]) -> Table:
    table = Table(title="Pool", title_justify="left", show_header=True)
    table.add_column("sandboxes", justify="right")
    table.add_column("slots", justify="right")
    for state in SLOT_STATES:
        table.add_column(state, justify="right")
    table.add_column("waiting for a slot", justify="right")
    table.add_column("lost sandboxes", justify="right")
    states = pool.get("slots_by_state", {})
    waiting = pool.get("waiting_for_slot", 0)
    table.add_row(
        f"{count(pool.get('sandboxes'))} ({pool.get('min_containers', '?')}.."
        f"{pool.get('max_containers', '?')})",
        f"{count(pool.get('total_slots'))} ({pool.get('slots_per_sandbox', '?')} each)",
        *(
            Text(
                count(states.get(state)),
                style="red" if state == "error" and states.get(state) else "",
            )
            for state in SLOT_STATES
        ),
        Text(count(waiting), style="yellow" if waiting else ""),
        count(pool.get("lost_sandboxes")),
    )
    return table


def sandboxes_table(pool: dict[str, Any]) -> Table:
    table = Table(title="Sandboxes", title_justify="left")
    for name in ("sandbox", "slots", "free", "leased", "resetting", "running", "queued"):
        table.add_column(name, justify="left" if name == "sandbox" else "right")
    table.add_column("batches", justify="right")
    table.add_column("mean batch", justify="right")
    for sandbox in pool.get("per_sandbox", []):
        name = str(sandbox.get("sandbox_id", "?"))
        if sandbox.get("draining"):
            name += " (draining)"
        mean = sandbox.get("mean_batch_recent")
        table.add_row(
            name,
            count(sandbox.get("slots")),
            count(sandbox.get("free_slots")),
            count(sandbox.get("leased_slots")),
            count(sandbox.get("resetting_slots")),
            count(sandbox.get("in_flight_calls")),
            count(sandbox.get("queued_calls")),
            count(sandbox.get("batches")),
            f"{mean:.1f}" if isinstance(mean, int | float) else "-",
        )
    return table


def latency_line(latency: dict[str, Any]) -> Text:
    if not latency:
        return Text("Latency: no call yet", style="dim")
    return Text(
        f"Latency of the latest {count(latency.get('samples'))} calls: "
        f"p50 {latency.get('p50_ms', 0):.1f} ms  p90 {latency.get('p90_ms', 0):.1f} ms  "
        f"p99 {latency.get('p99_ms', 0):.1f} ms"
    )


def errors_view(errors: dict[str, Any] | None, now: float) -> Text | Group:
    if errors is None:
        return Text("Recent errors: this service's /status does not list them", style="dim")
    by_kind = errors.get("by_kind", {})
    if not by_kind:
        return Text("No call has failed.", style="green")
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(by_kind.items(), key=lambda i: -i[1]))
    table = Table(title="Latest failed calls", title_justify="left")
    for name in ("ago", "trajectory", "tool", "error kind", "error"):
        table.add_column(name, justify="right" if name == "ago" else "left")
    for error in reversed(errors.get("latest", [])):
        at = error.get("at")
        ago = f"{max(0.0, now - at):.0f} s" if isinstance(at, int | float) else "-"
        table.add_row(
            ago,
            str(error.get("trajectory_id", "")),
            str(error.get("tool", "")),
            Text(str(error.get("error_kind", "")), style="red"),
            str(error.get("error", "")),
        )
    return Group(Text(f"Failed calls by error kind since start: {kinds}"), table)


def notes(status: dict[str, Any]) -> list[Text]:
    """What needs an operator's eye: a backend error, sandboxes refused, a tool server down."""
    pool = status.get("pool", {})
    shown = []
    if pool.get("backend_error"):
        shown.append(Text(f"backend error: {pool['backend_error']}", style="bold red"))
    for sandbox, reason in (pool.get("refused_sandboxes") or {}).items():
        shown.append(Text(f"sandbox {sandbox} refused: {reason}", style="red"))
    for index, reason in (pool.get("backend", {}).get("failed") or {}).items():
        shown.append(Text(f"sandbox {index} failed: {reason}", style="red"))
    external = status.get("external_tools") or {}
    if external.get("last_error"):
        shown.append(Text(f"tool server: {external['last_error']}", style="yellow"))
    return shown


def render(status: dict[str, Any], url: str, now: float | None = None) -> Group:
    """The whole view of one ``/status`` answer."""
    pool = status.get("pool", {})
    return Group(
        overview(status, url),
        *notes(status),
        pool_table(pool),
        sandboxes_table(pool),
        latency_line(status.get("latency") or {}),
        errors_view(status.get("errors"), time.time() if now is None else now),
    )


class StatusReader:
    """Reads ``/status`` over one connection; a failure is a message, not an exception."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.client = ExecutorClient(url, token, retries=0, read_timeout_s=READ_TIMEOUT_S)

    def read(self) -> dict[str, Any] | str:
        try:
            return self.client.status().model_dump()
        except ExecutorUnreachable as exc:
            return f"cannot reach {self.url}/status: {exc.message}"
        except ExecutorError as exc:
            return f"{self.url}/status answered {exc}"

    def view(self) -> Group | Text:
        status = self.read()
        if isinstance(status, str):
            return Text(status, style="bold red")
        return render(status, self.url)

    def close(self) -> None:
        self.client.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="atropos-tool-executor status",
        description="Show an executor's pool, leases, latency and recent errors (GET /status).",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the executor (default {DEFAULT_URL})")
    parser.add_argument(
        "--token",
        default=os.environ.get("TOOL_EXECUTOR_TOKEN"),
        help="its bearer token (default $TOOL_EXECUTOR_TOKEN)",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_S,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    # How many refreshes --watch makes before it ends (for tests; unset: until Ctrl-C).
    parser.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch needs a positive number of seconds")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    console = Console()
    reader = StatusReader(args.url.rstrip("/"), args.token)
    try:
        if args.watch is None:
            status = reader.read()
            if isinstance(status, str):
                sys.exit(f"atropos-tool-executor status: {status}")
            console.print(render(status, reader.url))
            return
        watch(reader, args.watch, args.iterations, console)
    finally:
        reader.close()


def watch(reader: StatusReader, every_s: float, iterations: int | None, console: Console) -> None:
    """Refresh the view every ``every_s`` until Ctrl-C (or ``iterations`` refreshes)."""
    shown = 0
    try:
        with Live(reader.view(), console=console, auto_refresh=False) as live:
            shown = 1
            while iterations is None or shown < iterations:
                time.sleep(every_s)
                live.update(reader.view(), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass  # the way out of --watch
