"""A trivial call to the stateful Python interpreter against a ``python`` call, in the same run.

    python -m benchmarks.python_calls [--samples 300] [--block 50]

One sandbox server, one slot, sequential ``POST /execute`` calls over one keep-alive
connection: ``python_stateful`` with ``x += 1`` (the interpreter already started) and
``python`` with ``print(1)`` (a fresh python3 per call), in alternating blocks of ``--block``
calls until each has ``--samples``; and, as the floor any call pays (HTTP, the server, the
frame to the slot's agent and back), ``read_file`` of a one-byte file. Reported: p50 and p99
of each as the client sees them, the ratio of the medians, and the median ``duration_ms`` the
slot agent measured.

The client is the standard library's ``http.client``: httpx spends about half a millisecond
per request in the client itself on these machines, more than the interpreter's own work, and
the figure wanted is the server's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import time
from typing import Any

from benchmarks.common import QUIET, machine_summary
from harness.servers import start_sandbox

TOKEN = "bench-token"
STATEFUL = {"slot_id": "slot_0", "tool": "python_stateful", "args": {"code": "x += 1"}}
FRESH = {"slot_id": "slot_0", "tool": "python", "args": {"code": "print(1)"}}
FLOOR = {"slot_id": "slot_0", "tool": "read_file", "args": {"path": "one"}}


class Client:
    """``POST /execute`` over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def execute(self, item: dict[str, Any]) -> dict[str, Any]:
        self.connection.request("POST", "/execute", json.dumps(item), self.headers)
        response = self.connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result


def timed_calls(client: Client, item: dict[str, Any], count: int) -> list[tuple[float, float]]:
    """(client ms, agent ms) of ``count`` calls of ``item``, one after another (agent ms: 0
    for a tool that runs no command, which does not measure itself)."""
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        result = client.execute(item)
        took = (time.perf_counter() - started) * 1000
        assert result["success"], result
        timings.append((took, result["metadata"].get("duration_ms", 0.0)))
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)]


def summary(timings: list[tuple[float, float]]) -> dict[str, float]:
    client = [took for took, _ in timings]
    figures = {
        "p50_ms": round(statistics.median(client), 3),
        "p99_ms": round(percentile(client, 0.99), 3),
    }
    agent = statistics.median(agent for _, agent in timings)
    if agent:
        figures["agent_p50_ms"] = round(agent, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()

    server = start_sandbox(slots=1, token=TOKEN, args=QUIET)
    stateful: list[tuple[float, float]] = []
    fresh: list[tuple[float, float]] = []
    floor: list[tuple[float, float]] = []
    try:
        client = Client(server.port)
        client.execute({**FLOOR, "tool": "write_file", "args": {"path": "one", "content": "1"}})
        # The interpreter starts here, outside the figures; then a warm-up of each.
        timed_calls(client, {**STATEFUL, "args": {"code": "x = 0"}}, 1)
        timed_calls(client, STATEFUL, args.block)
        timed_calls(client, FRESH, args.block // 5)
        timed_calls(client, FLOOR, args.block)
        while len(stateful) < args.samples:
            count = min(args.block, args.samples - len(stateful))
            stateful += timed_calls(client, STATEFUL, count)
            fresh += timed_calls(client, FRESH, count)
            floor += timed_calls(client, FLOOR, count)
        final = client.execute({**STATEFUL, "args": {"code": "x"}})
    finally:
        server.stop()

    expected = args.block + args.samples
    assert final["metadata"]["value"] == str(expected), final  # every call ran, in one state
    stateful_summary, fresh_summary = summary(stateful), summary(fresh)
    report = {
        "benchmark": "python_calls",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.python_calls", *sys.argv[1:]]),
        "samples": args.samples,
        "block": args.block,
        "python_stateful": stateful_summary,
        "python": fresh_summary,
        "read_file_floor": summary(floor),
        "ratio_p50": round(fresh_summary["p50_ms"] / stateful_summary["p50_ms"], 1),
        "target_stateful_p50_ms": 2.0,
        "target_ratio": 10,
        "python_version": platform.python_version(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
