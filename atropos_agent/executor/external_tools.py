"""Tools that live on a separate tool server (web search and the like), forwarded as they are.

The tool server lists its tools at ``GET {url}/tools`` (``{"tools": [function schemas]}``) and
runs one at ``POST {url}/execute`` with ``{trajectory_id, tool, timeout_s}``, answering a
ToolResult. The list is read at start-up and again every ``REFRESH_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from atropos_agent.errors import ExternalToolError
from atropos_agent.models import ToolCall, ToolResult

log = logging.getLogger("atropos.tools")

REFRESH_S = 60.0
GRACE_S = 10.0


class ExternalTools:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = url.rstrip("/") if url else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.schemas: dict[str, dict[str, Any]] = {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self.refresher: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    async def start(self) -> None:
        if self.url is None:
            return
        await self.refresh()
        self.refresher = asyncio.create_task(self._refresh_forever(), name="tool-server-refresh")

    async def stop(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.refresher
        await self.client.aclose()

    async def refresh(self) -> None:
        assert self.url is not None
        try:
            response = await self.client.get(self.url + "/tools", headers=self.headers)
            response.raise_for_status()
            tools = response.json()["tools"]
            self.schemas = {schema["function"]["name"]: schema for schema in tools}
            self.last_error = None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # Keep the last good list: a blip of the tool server does not unlist its tools.
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("event=tool_server_unreachable url=%s error=%s", self.url, self.last_error)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    def has(self, name: str) -> bool:
        return name in self.schemas

    def names(self) -> set[str]:
        return set(self.schemas)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "tools": sorted(self.schemas), "last_error": self.last_error}

    async def execute(self, trajectory_id: str, tool: ToolCall, timeout_s: float) -> ToolResult:
        assert self.url is not None
        payload = {
            "trajectory_id": trajectory_id,
            "tool": tool.model_dump(),
            "timeout_s": timeout_s,
        }
        try:
            response = await self.client.post(
                self.url + "/execute",
                json=payload,
                headers=self.headers,
                timeout=httpx.Timeout(10.0, read=timeout_s + GRACE_S),
            )
            response.raise_for_status()
            return ToolResult.model_validate(response.json())
        except httpx.HTTPStatusError as exc:
            raise ExternalToolError(
                f"tool server answered {exc.response.status_code} for {tool.name!r}: "
                f"{exc.response.text[:300]}"
            ) from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise ExternalToolError(f"tool server failed for {tool.name!r}: {exc}") from exc
