"""HTTP layer: routing, ACL tokens, regions, blocking queries and Nomad's response headers.

https://developer.hashicorp.com/nomad/api-docs (ACLs, Namespaces, Blocking Queries,
Consistency Modes, HTTP Response Codes). Errors are plain-text bodies, as
``command/agent/http.go`` writes them.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .common import NS_PER_S, NomadError, parse_go_duration
from .state import State

PLAIN = "text/plain; charset=utf-8"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.query.get("namespace") or "default"

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query parameter parsed as Go's strconv.ParseBool."""
        raw = self.query.get(name)
        if raw is None:
            return default
        if raw == "":
            return True
        lowered = raw.lower()
        if lowered in ("1", "t", "true"):
            return True
        if lowered in ("0", "f", "false"):
            return False
        raise NomadError(400, f'strconv.ParseBool: parsing "{raw}": invalid syntax')

    def json(self, *, required: bool = True) -> Any:
        if not self.body:
            if required:
                raise NomadError(400, "Request body is empty")
            return None
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise NomadError(400, str(exc)) from exc


@dataclass
class Reply:
    body: Any = None
    status: int = 200
    index: int | None = None


Handler = Callable[[Request], Any]


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    pattern: re.Pattern[str]
    handler: Handler
    acl: bool = True


def route(methods: str, pattern: str, handler: Handler, *, acl: bool = True) -> Route:
    return Route(tuple(methods.split(",")), re.compile(f"^{pattern}$"), handler, acl)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: API) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.connections_lock:
            sockets = list(self.connections)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        request = Request(
            method=self.command,
            path=unquote(parts.path),
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        outcome = self.server.api.dispatch(request)
        if outcome is None:  # the agent went down while the request was waiting
            self.close_connection = True
            return
        status, headers, payload = outcome
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:
            self.close_connection = True


class API:
    """Serves ``routes`` over HTTP for one :class:`State`."""

    def __init__(
        self,
        state: State,
        routes: list[Route],
        *,
        acl_token: str | None,
        max_wait_s: float,
    ) -> None:
        self.state = state
        self.routes = routes
        self.acl_token = acl_token
        self.max_wait_s = max_wait_s
        self.down = threading.Event()
        self.request_log: deque[str] = deque(maxlen=2000)
        self.internal_errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self, port: int = 0) -> int:
        server = _Server(("127.0.0.1", port), self)
        self.port = server.server_address[1]
        self._server = server
        self.down.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop answering: close the listener and every open connection."""
        self.down.set()
        with self.state.changed:
            self.state.changed.notify_all()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- dispatch ----------------------------------------------------------------------------

    def dispatch(self, request: Request) -> tuple[int, dict[str, str], bytes] | None:
        self.request_log.append(f"{request.method} {request.path}")
        headers: dict[str, str] = {}
        try:
            matched = self._match(request)
            if matched is None:
                return 404, headers, b""
            if matched.acl:
                self._authorize(request)
            region = request.query.get("region")
            if region and region != self.state.region:
                raise NomadError(500, "No path to region")
            if request.method == "GET":
                self._block(request)
                if self.down.is_set():
                    return None
            result = matched.handler(request)
            reply = result if isinstance(result, Reply) else Reply(result)
            if request.method == "GET":
                headers.update(self._meta_headers())
            headers["X-Nomad-Index"] = str(reply.index or self.state.index)
            if reply.status == 204:
                return reply.status, headers, b""
            headers["Content-Type"] = "application/json"
            return reply.status, headers, json.dumps(reply.body).encode()
        except NomadError as err:
            if request.method == "GET" and err.code != 403:
                headers.update(self._meta_headers())
                headers["X-Nomad-Index"] = str(self.state.index)
            headers["Content-Type"] = PLAIN
            return err.code, headers, err.message.encode()
        except Exception as exc:  # a bug in the double: answer like Nomad's 500s, keep the trace
            self.internal_errors.append(traceback.format_exc())
            headers["Content-Type"] = PLAIN
            return 500, headers, f"nomad test double internal error: {exc!r}".encode()

    def _match(self, request: Request) -> Route | None:
        """The first route whose path matches decides the resource; then the method must fit."""
        pattern: str | None = None
        for candidate in self.routes:
            if pattern is None:
                if candidate.pattern.match(request.path) is None:
                    continue
                pattern = candidate.pattern.pattern
            elif candidate.pattern.pattern != pattern:
                continue
            method = "GET" if request.method == "HEAD" else request.method
            if method in candidate.methods:
                found = candidate.pattern.match(request.path)
                assert found is not None
                request.params = {k: v for k, v in found.groupdict().items() if v is not None}
                return candidate
        if pattern is not None:
            raise NomadError(405, "Invalid method")
        return None

    def _authorize(self, request: Request) -> None:
        if self.acl_token is None:
            return
        token = request.headers.get("x-nomad-token", "")
        auth = request.headers.get("authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            raise NomadError(403, "Permission denied")
        if token != self.acl_token:
            raise NomadError(403, "ACL token not found")

    def _block(self, request: Request) -> None:
        wait_s = 300.0
        if "wait" in request.query:
            try:
                wait_s = parse_go_duration(request.query["wait"]) / NS_PER_S
            except ValueError as exc:
                raise NomadError(400, "Invalid wait time") from exc
        raw_index = request.query.get("index")
        if not raw_index:
            return
        if not raw_index.isdigit():
            raise NomadError(400, "Invalid index")
        min_index = int(raw_index)
        if min_index <= 0:
            return
        deadline_s = min(wait_s, 600.0, self.max_wait_s)
        self._wait_until(min_index, deadline_s)

    def _wait_until(self, min_index: int, wait_s: float) -> None:
        with self.state.changed:
            self.state.changed.wait_for(
                lambda: self.state.index > min_index or self.state.closing or self.down.is_set(),
                wait_s,
            )

    def _meta_headers(self) -> dict[str, str]:
        return {"X-Nomad-KnownLeader": "true", "X-Nomad-LastContact": "0"}
