"""Tools of an external tool server: listed, forwarded with its token, in order with the
trajectory's sandbox calls. The tool server is a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from harness.servers import ExecutorServer, start_executor
from tests.executor_support import settings

TOOL_TOKEN = "tool-server-token"
SEARCH = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


class ToolServer(ThreadingHTTPServer):
    calls: list[dict[str, Any]]


class Handler(BaseHTTPRequestHandler):
    server: ToolServer

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {TOOL_TOKEN}":
            self.reply(403, {"error": "bad token"})
            return False
        return True

    def do_GET(self) -> None:
        if self.authorized():
            self.reply(200, {"tools": [SEARCH]})

    def do_POST(self) -> None:
        if not self.authorized():
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append({**request, "received": time.monotonic()})
        query = request["tool"]["arguments"].get("query", "")
        self.reply(
            200,
            {
                "success": True,
                "output": f"results for {query}",
                "metadata": {"trajectory": request["trajectory_id"]},
            },
        )


@pytest.fixture(scope="module")
def tool_server() -> Iterator[ToolServer]:
    server = ToolServer(("127.0.0.1", 0), Handler)
    server.calls = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def executor_with_tools(tool_server: ToolServer) -> Iterator[ExecutorServer]:
    url = f"http://127.0.0.1:{tool_server.server_address[1]}"
    server = start_executor(env=settings(tool_server_url=url, tool_server_token=TOOL_TOKEN))
    yield server
    server.stop()


def test_external_tools_are_listed(executor_with_tools: ExecutorServer) -> None:
    names = [
        t["function"]["name"] for t in executor_with_tools.client.get("/tools").json()["tools"]
    ]
    assert "web_search" in names and "terminal" in names


def test_external_call_is_forwarded(
    executor_with_tools: ExecutorServer, tool_server: ToolServer
) -> None:
    result = executor_with_tools.call("ext-1", "web_search", timeout_s=7, query="nomad")
    assert result["success"] and result["output"] == "results for nomad"
    forwarded = tool_server.calls[-1]
    assert forwarded["trajectory_id"] == "ext-1"
    assert forwarded["timeout_s"] == 7
    assert forwarded["tool"]["uniq_id"] == result["uniq_id"]


def test_external_call_never_runs_ahead_of_the_trajectorys_sandbox_call(
    executor_with_tools: ExecutorServer, tool_server: ToolServer
) -> None:
    finished: dict[str, float] = {}

    def sandbox_call() -> None:
        executor_with_tools.sh("ext-2", "sleep 1.5; echo done")
        finished["sandbox"] = time.monotonic()

    thread = threading.Thread(target=sandbox_call)
    thread.start()
    time.sleep(0.3)  # the sandbox call is submitted first
    result = executor_with_tools.call("ext-2", "web_search", query="after")
    thread.join(timeout=30)
    assert result["success"]
    received = next(c for c in tool_server.calls if c["trajectory_id"] == "ext-2")["received"]
    assert received >= finished["sandbox"] - 0.05

    # Another trajectory's external call does not wait for it.
    started = time.monotonic()
    sleeper = threading.Thread(target=lambda: executor_with_tools.sh("ext-3", "sleep 2"))
    sleeper.start()
    time.sleep(0.2)
    assert executor_with_tools.call("ext-4", "web_search", query="now")["success"]
    assert time.monotonic() - started < 1.5
    sleeper.join(timeout=30)
