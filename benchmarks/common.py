"""Helpers shared by the benchmarks: ports, child processes, and what machine ran them."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from atropos_agent.executor.backends.local import free_port

__all__ = [
    "JsonClient",
    "bench_dir",
    "free_port",
    "machine_summary",
    "start_executor_server",
    "start_sandbox_server",
    "wait_healthy",
]


async def wait_healthy(
    url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with status {process.returncode}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s}s")


def machine_summary() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                "",
            )
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory_gib:.0f} GiB, "
        f"{platform.system()} {platform.release()}"
    )


class JsonClient:
    """A lean JSON-over-HTTP client for load generation.

    aiohttp rather than httpx here: with hundreds of concurrent requests httpx's connection
    pool costs the load generator a whole core, and the measurement becomes the client's.
    """

    def __init__(self, base_url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(
            base_url,
            headers=headers,
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=900),
        )

    async def post(self, path: str, body: Any) -> Any:
        async with self.session.post(path, json=body) as response:
            return await response.json(content_type=None)

    async def get(self, path: str) -> Any:
        async with self.session.get(path) as response:
            return await response.json(content_type=None)

    async def close(self) -> None:
        await self.session.close()


def bench_dir() -> Path:
    """A scratch directory the slots' own uids can traverse (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix="atropos-bench-"))
    path.chmod(0o711)
    return path


def start_sandbox_server(
    port: int, slots: int, data_dir: Path, token: str | None = None, *extra: str
) -> subprocess.Popen[bytes]:
    """``python -m atropos_agent.sandbox`` with none of this shell's ATROPOS_SANDBOX_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATROPOS_SANDBOX_")}
    if token:
        env["ATROPOS_SANDBOX_TOKEN"] = token
    argv = [
        sys.executable,
        "-m",
        "atropos_agent.sandbox",
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
        *extra,
    ]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)


def start_executor_server(
    port: int, settings: dict[str, str], log_path: Path | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``atropos-tool-executor serve`` with exactly ``settings`` as its TOOL_EXECUTOR_* ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
    env.update(settings)
    argv = [
        sys.executable,
        "-m",
        "atropos_agent.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    output = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=cwd)
