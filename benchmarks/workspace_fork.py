"""Forking a prepared workspace against copying it, and an upload's throughput, in one run.

    python -m benchmarks.workspace_fork [--files 10000] [--mb 200] [--forks 16] [--rounds 3]

One executor (local backend, one sandbox of ``--forks`` + 1 slots). A template of ``--files``
files adding up to ``--mb`` MB (hex text in 100 directories: source-like, it compresses about
2:1) is uploaded once (``PUT /templates/{name}``), and a source trajectory started from it.
Each round, alternating:

- fork: from sending ``POST /fork`` for ``--forks`` new trajectories until each of them has
  answered one ``ls`` (sent together, as a trainer's rollouts would);
- copy: ``cp -a`` of the same tree into ``--forks`` fresh directories, all at once: what
  preparing each workspace costs without copy-on-write.

The forks are released (and their slots reset) and the copies removed between rounds, outside
the timings. Then, once the copies' writes reached the disk, the upload: a tar.gz of 5,000
files holding 50 MB of random bytes (so the archive is 50 MB too), sent raw
(``PUT /trajectories/{id}/archive``) into a new trajectory, from the request until its
answer, each round; MB/s of the archive. Beside it, the same archive sent straight to a slot
of a sandbox server of its own (``PUT /slots/{id}/archive``): what the sandbox's checks and
extraction cost, and so what the executor adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import QUIET, JsonClient, machine_summary
from harness.servers import SandboxServer, start_executor, start_sandbox, temporary_dir

MB = 1_000_000
UPLOAD_FILES = 5000
UPLOAD_MB = 50
UID_BASE = 6_000_000 + (os.getpid() % 10_000) * 100


def make_tree(root: Path, files: int, total_bytes: int, text: bool) -> None:
    """``files`` files in 100 directories, ``total_bytes`` in all: hex text or random bytes."""
    size = total_bytes // files
    for number in range(files):
        directory = root / f"dir{number % 100:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size // 2).hex().encode() if text else os.urandom(size)
        (directory / f"file{number:05d}.txt").write_bytes(data)


def pack(tree: Path, archive: Path) -> None:
    """A tar.gz of the tree's contents, owners left out (gzip -1: packing is not measured)."""
    with open(archive, "wb") as out:
        tar = subprocess.Popen(
            ["tar", "-C", str(tree), "--owner=0", "--group=0", "--numeric-owner", "-cf", "-", "."],
            stdout=subprocess.PIPE,
        )
        subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
        assert tar.wait() == 0


async def put_file(
    session: aiohttp.ClientSession, path: str, archive: Path, params: dict[str, str] | None = None
) -> tuple[Any, float]:
    """PUT the file as the raw body; its answer and the seconds from sending to answer."""
    with open(archive, "rb") as body:
        started = time.perf_counter()
        async with session.put(
            path, data=body, params=params, headers={"Content-Type": "application/gzip"}
        ) as response:
            answer = await response.json(content_type=None)
            took = time.perf_counter() - started
    assert response.status == 200, answer
    return answer, took


async def fork_round(client: JsonClient, forks: int, tag: str) -> tuple[float, float]:
    """Seconds until the fork answered, and until every fork answered its ``ls``."""
    names = [f"{tag}-{number}" for number in range(forks)]
    started = time.perf_counter()
    answer = await client.post("/fork", {"trajectory_id": "source", "new_trajectory_ids": names})
    forked = time.perf_counter() - started
    assert len(answer.get("forks", [])) == forks, answer

    async def ls(name: str) -> None:
        call = {"trajectory_id": name, "tool": {"name": "terminal", "arguments": {"command": "ls"}}}
        result = await client.post("/execute", call)
        assert result["success"] and "dir099" in result["output"], result

    await asyncio.gather(*(ls(name) for name in names))
    took = time.perf_counter() - started
    await asyncio.gather(
        *(client.post("/release", {"trajectory_id": n, "reset_workspace": True}) for n in names)
    )
    return forked, took


async def copy_round(tree: Path, scratch: Path, copies: int, tag: str) -> float:
    targets = [scratch / f"{tag}-{number}" for number in range(copies)]
    started = time.perf_counter()
    processes = [
        await asyncio.create_subprocess_exec("cp", "-a", str(tree), str(target))
        for target in targets
    ]
    codes = await asyncio.gather(*(process.wait() for process in processes))
    took = time.perf_counter() - started
    assert codes == [0] * copies, codes
    assert sum(1 for _ in targets[-1].rglob("*.txt")) == sum(1 for _ in tree.rglob("*.txt"))
    for target in targets:
        shutil.rmtree(target)
    return took


async def measure(
    url: str, token: str | None, sandbox: SandboxServer, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    tree, archive = work / "template", work / "template.tar.gz"
    make_tree(tree, args.files, args.mb * MB, text=True)
    pack(tree, archive)
    upload_tree, upload_archive = work / "upload", work / "upload.tar.gz"
    make_tree(upload_tree, UPLOAD_FILES, UPLOAD_MB * MB, text=False)
    pack(upload_tree, upload_archive)
    scratch = work / "copies"
    scratch.mkdir()

    client = JsonClient(url, token)
    direct = JsonClient(sandbox.url, sandbox.token)
    try:
        template, template_s = await put_file(client.session, "/templates/bench", archive)
        # The template's first use on the sandbox: sent there, unpacked into its layer store.
        started = time.perf_counter()
        source = await client.post(
            "/trajectories", {"trajectory_id": "source", "template": "bench"}
        )
        first_use_s = time.perf_counter() - started
        assert source.get("template") == "bench", source
        forks: list[float] = []
        fork_requests: list[float] = []
        copies: list[float] = []
        uploads: list[float] = []
        direct_uploads: list[float] = []
        upload_answer: Any = None
        for number in range(args.rounds):
            fork_request, fork = await fork_round(client, args.forks, f"fork{number}")
            forks.append(fork)
            fork_requests.append(fork_request)
            copies.append(await copy_round(tree, scratch, args.forks, f"copy{number}"))
        # The copies' writes reach the disk first: uploads are not measured against them.
        await asyncio.to_thread(os.sync)
        for number in range(args.rounds):
            upload_answer, took = await put_file(
                client.session, f"/trajectories/upload{number}/archive", upload_archive
            )
            uploads.append(took)
            await client.post("/release", {"trajectory_id": f"upload{number}"})
            # The same archive straight into a sandbox's slot: what the executor adds.
            _, took = await put_file(direct.session, "/slots/slot_0/archive", upload_archive)
            direct_uploads.append(took)
            await direct.post("/reset", {"slot_id": "slot_0"})
        status = await client.get("/status")
    finally:
        await client.close()
        await direct.close()

    fork_p50, copy_p50 = statistics.median(forks), statistics.median(copies)
    upload_mb = upload_archive.stat().st_size / MB
    return {
        "template": {
            "files": args.files,
            "content_mb": args.mb,
            "archive_mb": round(template["bytes"] / MB, 1),
            "upload_s": round(template_s, 2),
            "first_use_on_a_sandbox_s": round(first_use_s, 2),
        },
        "fork_s": [round(f, 3) for f in forks],
        "fork_request_s": [round(f, 3) for f in fork_requests],
        "copy_s": [round(c, 3) for c in copies],
        "fork_p50_s": round(fork_p50, 3),
        "copy_p50_s": round(copy_p50, 3),
        "ratio_p50": round(copy_p50 / fork_p50, 1),
        "target_ratio": 10,
        "target_fork_s": 0.5,
        "upload": {
            "files": upload_answer["entry_count"],
            "archive_mb": round(upload_mb, 1),
            "seconds": [round(u, 3) for u in uploads],
            "mb_per_s_p50": round(upload_mb / statistics.median(uploads), 1),
            "direct_to_sandbox_seconds": [round(u, 3) for u in direct_uploads],
            "direct_mb_per_s_p50": round(upload_mb / statistics.median(direct_uploads), 1),
        },
        "workspace_layers": [s.get("workspace_layers") for s in status["pool"]["per_sandbox"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--forks", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = {
        "TOOL_EXECUTOR_SLOTS": str(args.forks + 1),
        "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
        "TOOL_EXECUTOR_MAX_CONTAINERS": "1",
        "TOOL_EXECUTOR_ACQUIRE_TIMEOUT_S": "120",
        # Slot uids of this run's own: other servers on this host may run beside it.
        "TOOL_EXECUTOR_SANDBOX_SLOT_UID_BASE": str(UID_BASE),
    }
    server = start_executor(env=env, defaults={}, args=QUIET)
    direct_uids = {"ATROPOS_SANDBOX_SLOT_UID_BASE": str(UID_BASE + args.forks + 1)}
    sandbox = start_sandbox(slots=1, args=QUIET, env=direct_uids)
    try:
        with temporary_dir() as work:
            figures = asyncio.run(measure(server.url, server.token, sandbox, work, args))
    finally:
        sandbox.stop()
        server.stop()
    report = {
        "benchmark": "workspace_fork",
        "machine": machine_summary(),
        "command": " ".join(["python -m benchmarks.workspace_fork", *sys.argv[1:]]),
        **figures,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
