"""Memory an idle slot costs beyond the sandbox server itself.

    python -m benchmarks.slot_memory [--slots 16]

Starts a real sandbox server, then reads the proportional set size (PSS: private pages plus a
fair share of shared ones, from /proc/PID/smaps_rollup) and the unique set size (USS: private
pages only) of every process below the server: per slot, the outer bubblewrap, the namespace's
init and the slot agent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import QUIET, machine_summary
from harness.servers import start_sandbox

KIB = 1024


def smaps(pid: int) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * KIB
    return fields


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def measure(server_pid: int, slots: int) -> dict[str, float]:
    pss = uss = 0
    processes = descendants(server_pid)
    for pid in processes:
        fields = smaps(pid)
        pss += fields["Pss"]
        uss += fields["Private_Clean"] + fields["Private_Dirty"]
    server = smaps(server_pid)
    mib = 1024 * 1024
    return {
        "slots": slots,
        "processes_per_slot": len(processes) / slots,
        "pss_per_slot_mib": round(pss / slots / mib, 2),
        "uss_per_slot_mib": round(uss / slots / mib, 2),
        "server_pss_mib": round(server["Pss"] / mib, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args()
    server = start_sandbox(slots=args.slots, token=None, args=QUIET)
    try:
        # Every slot runs one call first, so the figure is for a used, then idle, slot.
        items = [
            {"slot_id": f"slot_{i}", "tool": "terminal", "args": {"command": "true"}}
            for i in range(args.slots)
        ]
        server.client.post("/batch", json=items, timeout=60).raise_for_status()
        time.sleep(0.5)
        report = {
            "benchmark": "slot_memory",
            "machine": machine_summary(),
            "command": " ".join(["python -m benchmarks.slot_memory", *sys.argv[1:]]),
            **measure(server.process.pid, args.slots),
            "target_mib": 10,
        }
    finally:
        server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
