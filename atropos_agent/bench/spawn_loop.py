"""The machine's limit for running a command: a plain ``bash -c 'echo hi'`` spawn loop, one
worker process per core, each starting the shell, reading its output and waiting for it, back
to back. A trivial call through the service does that much work and more (HTTP, a lease, a
frame to the slot's agent), so its rate is read as a fraction of this one.

Run as ``python -m atropos_agent.bench.spawn_loop START DURATION``, a worker loops from the
``time.monotonic()`` instant START (the clock is the machine's, shared by its processes) for
DURATION seconds (a worker that starts late loops for what is left), then prints
``{"calls": n, "errors": n, "elapsed_s": s}``. ``run_spawn_loop`` starts the workers and adds
their rates up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

COMMAND = ["bash", "-c", "echo hi"]
# Time the workers get to start python before the common window opens.
START_DELAY_S = 0.5
WORKER_TIMEOUT_MARGIN_S = 60.0


@dataclass(frozen=True)
class SpawnLoopResult:
    """The workers' spawns over the window, and their summed rate."""

    workers: int
    calls: int
    errors: int
    elapsed_s: float
    calls_per_s: float


def loop(start: float, duration_s: float) -> dict[str, float]:
    """Spawn ``COMMAND`` back to back within the window: calls, errors, seconds looped."""
    time.sleep(max(0.0, start - time.monotonic()))
    began = time.monotonic()
    end = start + duration_s
    calls = errors = 0
    while time.monotonic() < end:
        done = subprocess.run(COMMAND, capture_output=True, check=False)
        calls += 1
        if done.returncode != 0 or done.stdout != b"hi\n":
            errors += 1
    return {"calls": calls, "errors": errors, "elapsed_s": time.monotonic() - began}


async def run_spawn_loop(duration_s: float, workers: int | None = None) -> SpawnLoopResult:
    """``workers`` (default: one per core) loops over the same window of ``duration_s``."""
    count = workers or os.cpu_count() or 1
    start = time.monotonic() + START_DELAY_S
    processes = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", __name__, repr(start), repr(duration_s)),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    try:
        outputs = await asyncio.wait_for(
            asyncio.gather(*(process.communicate() for process in processes)),
            START_DELAY_S + duration_s + WORKER_TIMEOUT_MARGIN_S,
        )
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    counts = []
    for process, (stdout, _) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a spawn loop worker exited with status {process.returncode}")
        counts.append(json.loads(stdout))
    return SpawnLoopResult(
        workers=count,
        calls=sum(c["calls"] for c in counts),
        errors=sum(c["errors"] for c in counts),
        elapsed_s=duration_s,
        calls_per_s=sum(c["calls"] / c["elapsed_s"] for c in counts if c["elapsed_s"] > 0),
    )


def main() -> None:
    print(json.dumps(loop(float(sys.argv[1]), float(sys.argv[2]))))


if __name__ == "__main__":
    main()
