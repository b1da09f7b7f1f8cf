"""How our servers run under uvicorn: bounded connections, a long keep-alive, a bounded shutdown.

uvicorn leaves three things unbounded that a shared service cannot: a connection that never
sends a request, a request whose headers or body trickle in, and the wait for calls in flight at
shutdown. ``BoundedHttpProtocol`` adds the first two bounds to uvicorn's httptools protocol;
``ShutdownWatch`` the third (see ``executor/app.py``).

Both ways of serving get the same bounds: ``run`` (``atropos-tool-executor serve`` and the
sandbox server) passes them to uvicorn; an app started as ``uvicorn module:app`` calls
``tune_running_server`` from its lifespan, which finds the uvicorn server that runs it (the
owner of its SIGTERM handler) and sets them there, before the server accepts connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("atropos.serving")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


@dataclass(frozen=True)
class ConnectionBounds:
    # Longer than any common client's idle keep-alive (httpx 5 s, aiohttp 15 s), so that a
    # client never reuses a connection at the moment the server closes it.
    keep_alive_s: float = 75.0
    # From a connection's start, or a request's first byte, until its headers are complete:
    # a connection that sends nothing is closed after this too.
    header_timeout_s: float = 10.0
    # From the end of a request's headers until the end of its body.
    body_timeout_s: float = 60.0


# The ASGI scope key under which a request finds the callbacks to run if its client goes away
# before the answer (a list: append to it). Present only under ``BoundedHttpProtocol``.
ON_DISCONNECT = "atropos.on_disconnect"
# How often the deadlines of all connections are checked (one timer per event loop, rather
# than a timer per request, which would cost more than the request's own parsing).
SWEEP_S = 0.5


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with deadlines for a request's headers and its body, and
    callbacks for a client that goes away before its answer (``ON_DISCONNECT``).

    A missed deadline answers 408 (when no response was started) and closes the connection.
    """

    bounds = ConnectionBounds()
    # Connections with a deadline, per event loop; swept every SWEEP_S.
    watched: ClassVar[dict[asyncio.AbstractEventLoop, set[BoundedHttpProtocol]]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.deadline_at = 0.0
        self.deadline_part = ""
        super().connection_made(transport)
        self._arm(self.bounds.header_timeout_s, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            for callback in self.scope.get(ON_DISCONNECT, ()):  # type: ignore[attr-defined]
                callback()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[ON_DISCONNECT] = []  # type: ignore[literal-required]
        self._arm(self.bounds.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.bounds.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, part: str) -> None:
        self.deadline_at = self.loop.time() + seconds
        self.deadline_part = part
        watched = self.watched.get(self.loop)
        if watched is None:
            watched = self.watched[self.loop] = set()
            self.loop.call_later(SWEEP_S, sweep, self.loop)
        watched.add(self)

    def _disarm(self) -> None:
        self.deadline_part = ""
        watched = self.watched.get(self.loop)
        if watched is not None:
            watched.discard(self)

    def _expire(self) -> None:
        part = self.deadline_part
        self._disarm()
        if self.transport.is_closing():
            return
        if part == "idle":
            # A connection that sent nothing: closed quietly, as a keep-alive expiry is.
            self.transport.close()
            return
        seconds = self.bounds.header_timeout_s if part == "headers" else self.bounds.body_timeout_s
        cycle = self.cycle
        log.warning(
            "event=request_timeout part=%s after_s=%g client=%s", part, seconds, self.client
        )
        # During headers, self.cycle is still the previous request's (answered) one.
        if part == "headers" or cycle is None or not cycle.response_started:
            message = f"request {part} not received within {seconds:g}s"
            body = json.dumps({"error": message, "detail": message}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()


def sweep(loop: asyncio.AbstractEventLoop) -> None:
    """Expire the connections of ``loop`` past their deadline; again in SWEEP_S while any
    connection has one."""
    watched = BoundedHttpProtocol.watched.get(loop)
    if not watched:
        BoundedHttpProtocol.watched.pop(loop, None)
        return
    now = loop.time()
    for protocol in [p for p in watched if p.deadline_at <= now]:
        protocol._expire()
    loop.call_later(SWEEP_S, sweep, loop)


def bounded_protocol(bounds: ConnectionBounds) -> type[BoundedHttpProtocol]:
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"bounds": bounds})


def run(app: Any, host: str, port: int, bounds: ConnectionBounds, **options: Any) -> None:
    """``uvicorn.run`` with ``bounds`` (``options``: uvicorn's other settings)."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=bounded_protocol(bounds),
        timeout_keep_alive=int(bounds.keep_alive_s),
        **options,
    )


def log_events(level: int | str = logging.INFO) -> None:
    """Show this project's events when nothing set up logging (plain ``uvicorn module:app``
    configures only its own loggers, which would leave ours unseen)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)


def running_server() -> uvicorn.Server | None:
    """The uvicorn server running this process, found as the owner of its SIGTERM handler."""
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, uvicorn.Server) else None


def tune_running_server(bounds: ConnectionBounds, graceful_s: float) -> None:
    """Give a server started as ``uvicorn module:app`` the bounds ``run`` gives its own.

    Called from the app's lifespan: uvicorn makes a connection's protocol from its config when
    the connection arrives, and it starts listening only after the lifespan has started.
    """
    server = running_server()
    if server is None:
        log.warning(
            "event=server_not_tuned reason=not_run_by_uvicorn: connection and shutdown bounds "
            "are those of the server that runs this app"
        )
        return
    config = server.config
    config.timeout_keep_alive = max(config.timeout_keep_alive, int(bounds.keep_alive_s))
    if config.timeout_graceful_shutdown is None or config.timeout_graceful_shutdown > graceful_s:
        config.timeout_graceful_shutdown = int(graceful_s + 0.999)
    protocol = config.http_protocol_class
    if isinstance(protocol, type) and issubclass(protocol, HttpToolsProtocol):
        if not issubclass(protocol, BoundedHttpProtocol):
            config.http_protocol_class = bounded_protocol(bounds)
    else:
        log.warning(
            "event=request_bounds_inactive protocol=%s: run with --http httptools for header "
            "and body deadlines",
            getattr(protocol, "__name__", protocol),
        )


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; answers the limit now.

    Each connection and each sandbox connection is a file; the common soft default (1024)
    lets a burst of idle clients make the service unreachable.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("event=open_file_limit_unchanged soft=%d error=%s", soft, exc)
    return soft


class ShutdownWatch:
    """Runs ``on_signal`` when SIGTERM or SIGINT arrives, after whatever handler was there.

    The handler already installed (uvicorn's) still begins the server's shutdown; this only
    adds ours beside it. Outside the main thread (e.g. under a test client) there is nothing
    to watch, and ``installed`` is false.
    """

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.on_signal = on_signal
        self.previous: dict[int, Any] = {}
        self.loop = asyncio.get_running_loop()
        self.installed = False
        try:
            for sig in SHUTDOWN_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        except ValueError:  # not the main thread
            self.restore()

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        previous = self.previous.get(sig)
        if callable(previous):
            previous(sig, frame)
        self.loop.call_soon_threadsafe(self.on_signal)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)
        self.previous.clear()


class ExitDeadline:
    """Ends the process when its shutdown overruns ``seconds``, whatever still runs.

    A thread, not a task: it must fire even when the event loop is stuck. What the process
    leaves (sandbox children die with it; a pool directory) its successor cleans up.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None

    def start(self) -> None:
        if self.started is not None:
            return
        self.started = time.monotonic()
        timer = threading.Timer(self.seconds, self._exit)
        timer.daemon = True
        timer.start()

    def remaining(self) -> float | None:
        """Seconds left, or None before the shutdown began."""
        if self.started is None:
            return None
        return max(0.0, self.seconds - (time.monotonic() - self.started))

    def _exit(self) -> None:
        log.error("event=shutdown_overran bound_s=%g: exiting now", self.seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)
