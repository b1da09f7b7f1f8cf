"""The bytes between the executor and its sandbox servers: one seam, real or in memory.

``SandboxClient`` (``sandbox_client.py``) knows the protocol: paths, payloads, statuses. A
``Transport`` only moves an HTTP request and its answer. ``AiohttpTransport`` is the real one;
``MockTransport`` hands each request to a function in this process, as httpx's
``MockTransport`` does, so the pool, batcher and executor can be tested without processes.

aiohttp rather than httpx: per request it costs about a third of httpx's CPU, and batches to
sandboxes are the executor's hot path (docs/benchmarks.md).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from atropos_agent.errors import SandboxUnavailable

CONNECT_TIMEOUT_S = 10.0
# Idle connections to sandboxes are closed before the sandbox server's own 60 s keep-alive
# runs out, so the executor never reuses a connection the server is closing.
KEEPALIVE_S = 30.0
# Pieces of a body streamed through (archives): large enough to keep the copy cheap.
CHUNK_BYTES = 1024 * 1024


# A request body: bytes, or chunks sent as they come (an archive streamed through).
Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Longest wait for the next bytes of the answer (a batch waits for its slowest command).
    read_timeout_s: float = 30.0
    # A body sent chunk by chunk as it comes, instead of ``body`` (archives).
    stream: AsyncIterable[bytes] | None = None

    @classmethod
    def with_body(
        cls,
        method: str,
        url: str,
        body: Body,
        headers: Mapping[str, str],
        read_timeout_s: float,
    ) -> Request:
        if body is None or isinstance(body, bytes):
            return cls(method, url, body, headers, read_timeout_s)
        return cls(method, url, None, headers, read_timeout_s, stream=body)


class Response(abc.ABC):
    """An answer whose body may still be arriving."""

    status: int

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The whole body."""

    @abc.abstractmethod
    def lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each as soon as it arrived (NDJSON streams)."""

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive (an archive streamed on, never held whole)."""


class Transport(abc.ABC):
    @abc.abstractmethod
    def send(self, request: Request) -> contextlib.AbstractAsyncContextManager[Response]:
        """Send ``request``; raise ``SandboxUnavailable`` when no answer can be had."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


# ---------------------------------------------------------------- the real one


class AiohttpResponse(Response):
    def __init__(
        self, response: aiohttp.ClientResponse, url: str, read_timeout_s: float | None = None
    ) -> None:
        self.response = response
        self.status = response.status
        self.url = url
        self.read_timeout_s = read_timeout_s

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise unreachable(self.url, exc, self.read_timeout_s) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.content:
                yield line
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise unreachable(self.url, exc, self.read_timeout_s) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise unreachable(self.url, exc, self.read_timeout_s) from exc


class AiohttpTransport(Transport):
    """One connection pool for every sandbox of the pool, made on first use (it needs the
    running event loop)."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

    @contextlib.asynccontextmanager
    async def send(self, request: Request) -> AsyncIterator[Response]:
        timeout = aiohttp.ClientTimeout(
            sock_connect=CONNECT_TIMEOUT_S, sock_read=request.read_timeout_s
        )
        try:
            context = self._session().request(
                request.method,
                request.url,
                data=request.body if request.stream is None else request.stream,
                headers=dict(request.headers),
                timeout=timeout,
            )
            async with context as response:
                yield AiohttpResponse(response, request.url, request.read_timeout_s)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise unreachable(request.url, exc, request.read_timeout_s) from exc

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def unreachable(
    url: str, exc: BaseException, read_timeout_s: float | None = None
) -> SandboxUnavailable:
    """What went wrong, never empty: a bare ``TimeoutError`` says which wait ran out."""
    reason = str(exc)
    if not reason and isinstance(exc, TimeoutError) and read_timeout_s is not None:
        reason = f"nothing arrived within {read_timeout_s:g}s"
    reason = reason or "no reason given"
    return SandboxUnavailable(f"sandbox at {url} did not answer: {type(exc).__name__}: {reason}")


# ---------------------------------------------------------------- in memory


@dataclass
class MockResponse(Response):
    """An answer made in this process: a body, or lines handed out as they are produced."""

    status: int = 200
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    async def read(self) -> bytes:
        if self.stream is None:
            return self.body
        return b"".join([line async for line in self.stream])

    async def lines(self) -> AsyncIterator[bytes]:
        if self.stream is None:
            for line in self.body.splitlines(keepends=True):
                yield line
            return
        async for line in self.stream:
            yield line

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.stream is None:
            yield self.body
            return
        async for chunk in self.stream:
            yield chunk


Handler = Callable[[Request], Awaitable[MockResponse]]


class MockTransport(Transport):
    """Answers every request with ``handler(request)``; a handler may raise
    ``SandboxUnavailable`` to play a sandbox that does not answer."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    @contextlib.asynccontextmanager
    async def send(self, request: Request) -> AsyncIterator[Response]:
        yield await self.handler(request)

    async def close(self) -> None:
        pass
