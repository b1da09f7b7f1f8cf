"""Helpers shared by the benchmarks: what machine ran them, and a lean load generator.

Servers are started, waited for and stopped with ``harness.servers``, like the tests do.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import aiohttp

__all__ = ["QUIET", "JsonClient", "machine_summary"]

# Command-line options for the servers a benchmark starts: logging a line per call would
# cost them CPU the measurement should not include.
QUIET = ("--log-level", "warning")


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
