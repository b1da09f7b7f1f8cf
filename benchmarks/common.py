"""Helpers shared by the benchmarks: ports, child processes, and what machine ran them."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import time
from typing import Any

import aiohttp
import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_process(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)


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
