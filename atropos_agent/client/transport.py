"""The bytes between the trainer and its executors: one seam, real (aiohttp) or in memory.

A ``Transport`` moves one HTTP request and its answer, and turns every way of getting no
answer into ``ExecutorUnreachable`` (``sent`` false when the request never left). The client
above it knows routes, retries and routing; nothing here does.

aiohttp rather than httpx: at 64 concurrent trajectories httpx's pool spent about 4 ms of the
trainer's CPU per call, aiohttp's a tenth of that (docs/benchmarks.md, "The trainer-side
client's cost").
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from atropos_agent.errors import ExecutorUnreachable

# A connection that cannot be made in this long will not be made: the executor is down.
CONNECT_TIMEOUT_S = 10.0
# Idle connections are closed after this: under the service's keep-alive (75 s) and common
# proxies' (60 s), so no request goes out on a connection being closed; long enough that a
# trajectory whose calls come seconds apart (a model's turn between them) reuses its own.
KEEPALIVE_S = 30.0
# Connections open at once, over all executors: above it, requests wait their turn in order.
MAX_CONNECTIONS = 4096
# Bytes of a streamed answer read at a time; lines are cut from them here.
STREAM_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] | None = None
    # Longest wait for the next bytes of the answer.
    read_timeout_s: float = 30.0


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    # The Retry-After header, "" when absent.
    retry_after: str = ""


class StreamedAnswer(abc.ABC):
    """An answer whose body is still arriving (``/execute/stream``)."""

    status: int

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The whole body."""

    @abc.abstractmethod
    def lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each as soon as it arrived."""


class Transport(abc.ABC):
    @abc.abstractmethod
    async def request(self, request: Request) -> Answer:
        """Send ``request``; ``ExecutorUnreachable`` when no answer can be had."""

    @abc.abstractmethod
    def stream(self, request: Request) -> contextlib.AbstractAsyncContextManager[StreamedAnswer]:
        """Send ``request``; its answer as it arrives."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


# ---------------------------------------------------------------- the real one


def unreachable(url: str, exc: BaseException) -> ExecutorUnreachable:
    """What getting ``exc`` instead of an answer means: never sent, timed out, or cut."""
    never_sent = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    timed_out = not never_sent and isinstance(exc, TimeoutError)
    reason = str(exc) or "no answer in time"
    message = f"executor at {url} did not answer: {type(exc).__name__}: {reason}"
    return ExecutorUnreachable(url, message, sent=not never_sent, timed_out=timed_out)


FAILURES = (aiohttp.ClientError, TimeoutError, OSError)


class AiohttpStreamedAnswer(StreamedAnswer):
    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self.response = response
        self.status = response.status
        self.url = url

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except FAILURES as exc:
            raise unreachable(self.url, exc) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        # Cut here rather than with aiohttp's readline, which refuses lines over 128 KiB.
        pending = b""
        try:
            async for chunk in self.response.content.iter_chunked(STREAM_READ_BYTES):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line
        except FAILURES as exc:
            raise unreachable(self.url, exc) from exc
        if pending:
            yield pending


class AiohttpTransport(Transport):
    """One connection pool for every executor, made on first use (it needs the running
    event loop)."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_S)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

    def _options(self, request: Request) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=request.read_timeout_s
        )
        return {
            "data": request.body,
            "headers": request.headers,
            "params": request.params,
            "timeout": timeout,
        }

    async def request(self, request: Request) -> Answer:
        try:
            context = self._session().request(request.method, request.url, **self._options(request))
            async with context as response:
                body = await response.read()
                return Answer(response.status, body, response.headers.get("Retry-After", ""))
        except FAILURES as exc:
            raise unreachable(request.url, exc) from exc

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[StreamedAnswer]:
        try:
            context = self._session().request(request.method, request.url, **self._options(request))
            response = await context.__aenter__()
        except FAILURES as exc:
            raise unreachable(request.url, exc) from exc
        try:
            yield AiohttpStreamedAnswer(response, request.url)
        finally:
            if response.content.at_eof():
                response.release()
            else:  # left early: closing the connection is what tells the service to cancel
                response.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


# ---------------------------------------------------------------- in memory


class MockStreamedAnswer(StreamedAnswer):
    def __init__(self, answer: Answer) -> None:
        self.status = answer.status
        self.body = answer.body

    async def read(self) -> bytes:
        return self.body

    async def lines(self) -> AsyncIterator[bytes]:
        for line in self.body.splitlines():
            yield line


class MockTransport(Transport):
    """Answers every request with ``handler(request)``, in this process; a handler raises
    ``ExecutorUnreachable`` to play an executor that does not answer."""

    def __init__(self, handler: Callable[[Request], Answer]) -> None:
        self.handler = handler

    async def request(self, request: Request) -> Answer:
        await asyncio.sleep(0)  # a real answer always lets other tasks run
        return self.handler(request)

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[StreamedAnswer]:
        yield MockStreamedAnswer(self.handler(request))

    async def close(self) -> None:
        pass
