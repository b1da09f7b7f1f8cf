"""The executor's metrics on a port of their own, without auth, for scrapers.

``GET /metrics`` on the service's port asks for the trainers' token, like ``/status``; a
scraper given that token could also run commands. ``TOOL_EXECUTOR_METRICS_PORT`` serves the
same registry on another port (``TOOL_EXECUTOR_METRICS_HOST``, loopback by default) that
answers nothing else. It is an aiohttp server in the executor's own event loop, so a scrape
reads the pool's state where that state changes, never from another thread; it opens before
the executor starts and closes after it stopped (``with_metrics_port``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("atropos.api")

# Scrapes are small and quick: a scraper still connected at shutdown is not waited for.
STOP_TIMEOUT_S = 1.0
App = TypeVar("App")


class MetricsPort:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_TIMEOUT_S)

    async def metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise OSError(
                f"cannot serve metrics on {self.host}:{self.port} ({exc.strerror}): choose "
                "another TOOL_EXECUTOR_METRICS_PORT, or unset it"
            ) from exc
        log.info("event=metrics_port_open host=%s port=%d", self.host, self.port)

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.runner.cleanup(), STOP_TIMEOUT_S * 2)
        except TimeoutError:
            log.warning("event=metrics_port_stop_overran")


def with_metrics_port(
    lifespan: Callable[[App], AbstractAsyncContextManager[None]],
    registry: CollectorRegistry,
    host: str,
    port: int | None,
) -> Callable[[App], AbstractAsyncContextManager[None]]:
    """``lifespan`` with the metrics port open around it (``port`` None: ``lifespan`` alone)."""
    if port is None:
        return lifespan

    @asynccontextmanager
    async def serving(app: App) -> AsyncIterator[None]:
        server = MetricsPort(registry, host, port)
        await server.start()
        try:
            async with lifespan(app):
                yield
        finally:
            await server.stop()

    return serving
