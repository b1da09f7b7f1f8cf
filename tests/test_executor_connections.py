"""Connections to the executor are bounded, whichever way it is served.

Idle connections and requests whose headers or body trickle in are closed within their bounds;
a keep-alive connection outlives any common client's idle expiry, so a client never reuses a
connection the server is closing; the open-file limit is raised at start. The same holds for
``atropos-tool-executor serve`` and for the app run as ``uvicorn module:app``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import (
    TOKEN,
    ExecutorServer,
    start_executor,
)

BOUNDS = {
    "TOOL_EXECUTOR_REQUEST_HEADER_TIMEOUT_S": "1",
    "TOOL_EXECUTOR_REQUEST_BODY_TIMEOUT_S": "1",
}


def start_under_uvicorn(module: str, env: dict[str, str] | None = None) -> ExecutorServer:
    return start_executor(env=env, app_path=f"{module}:app")


@pytest.fixture(scope="module", params=["serve", "uvicorn"])
def bounded(request: pytest.FixtureRequest) -> Iterator[ExecutorServer]:
    """An executor with 1 s header and body bounds, served both ways."""
    if request.param == "serve":
        server = start_executor(env=BOUNDS)
    else:
        server = start_under_uvicorn("atropos_agent.executor.app", BOUNDS)
    yield server
    server.stop()


def connect(server: ExecutorServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def get_health(sock: socket.socket) -> bytes:
    """``GET /health`` on an open connection; the whole answer (status line to body)."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return answer


def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received, time.monotonic() - started


def test_a_connection_that_sends_nothing_is_closed(bounded: ExecutorServer) -> None:
    with connect(bounded) as sock:
        received, waited = closed_after(sock)
    assert received == b""
    assert 0.8 < waited < 4


def test_headers_that_trickle_in_get_408(bounded: ExecutorServer) -> None:
    with connect(bounded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\r\n")  # still no end of headers
        received, waited = closed_after(sock)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"headers not received within 1s" in received
    assert waited < 4


def test_a_body_that_trickles_in_gets_408(bounded: ExecutorServer) -> None:
    with connect(bounded) as sock:
        sock.sendall(
            b"POST /execute HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"traj'
        )
        received, waited = closed_after(sock)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"body not received within 1s" in received
    assert waited < 4


def test_many_idle_connections_are_closed_and_the_service_answers_meanwhile(
    bounded: ExecutorServer,
) -> None:
    sockets = [connect(bounded) for _ in range(300)]
    try:
        assert bounded.client.get("/health").status_code == 200
        time.sleep(2.5)
        for sock in sockets:
            sock.settimeout(3)
            assert sock.recv(1) == b""  # closed by the server, not still waiting
    finally:
        for sock in sockets:
            sock.close()


def test_a_request_after_a_slow_one_is_answered_on_the_same_connection(
    bounded: ExecutorServer,
) -> None:
    """The header bound restarts with each request of a kept-alive connection."""
    with connect(bounded) as sock:
        for _ in range(3):
            assert get_health(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.7)


def test_the_open_file_limit_is_raised_to_the_hard_limit(bounded: ExecutorServer) -> None:
    limits = Path(f"/proc/{bounded.process.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
    if bounded.log_path.exists():
        assert f"open_file_limit={soft}" in bounded.log()


@pytest.fixture(scope="module")
def old_app_path() -> Iterator[ExecutorServer]:
    """The previous release's app path, under uvicorn's defaults (5 s keep-alive)."""
    server = start_under_uvicorn("atropos_agent.api.tool_executor_server")
    yield server
    server.stop()


def test_a_kept_alive_connection_outlives_uvicorns_default(old_app_path: ExecutorServer) -> None:
    with connect(old_app_path) as sock:
        assert get_health(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # uvicorn's default keep-alive is 5 s
        assert get_health(sock).startswith(b"HTTP/1.1 200")


def test_requests_at_exactly_the_clients_expiry_are_all_answered(
    old_app_path: ExecutorServer,
) -> None:
    """httpx keeps an idle connection 5 s: requests 5 s apart reuse it at that very moment."""
    failures: list[str] = []
    answered: list[int] = []

    def client_loop(index: int) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=old_app_path.url, headers=headers, timeout=30) as client:
            for round_ in range(3):
                if round_:
                    time.sleep(5.0 + (index % 5 - 2) * 0.01)
                try:
                    answered.append(client.get("/status").status_code)
                except httpx.TransportError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(24)]
    run_all(threads)
    assert failures == []
    assert answered == [200] * 72


def run_all(threads: list[threading.Thread], join_s: float = 60) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_s)
    assert not any(thread.is_alive() for thread in threads)


def test_the_old_app_path_serves_the_same_routes(old_app_path: ExecutorServer) -> None:
    result = old_app_path.sh("old-path", "echo hi")
    assert result["success"] and result["output"].strip() == "hi"
