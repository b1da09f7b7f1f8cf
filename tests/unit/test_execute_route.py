"""``POST /execute`` answered without the framework (``executor/execute_route.py``): a
well-formed call is run by the executor and answered here; anything else reaches the app
untouched, its body replayed, so the framework's own errors answer it."""

from __future__ import annotations

import json
from typing import Any, cast

from starlette.types import Message

from atropos_agent.errors import QueueFull
from atropos_agent.executor.execute_route import ExecuteRoute
from atropos_agent.executor.executor import Executor
from atropos_agent.models import ToolResult
from tests.unit.fakes import run


class FakeExecutor:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, str, float | None]] = []

    def admit(self) -> None:
        if self.refuse:
            raise QueueFull("10 calls in the service (limit 10); retry shortly")

    async def execute(self, trajectory_id: str, tool: Any, timeout_s: Any, call: Any) -> ToolResult:
        self.calls.append((trajectory_id, tool.name, timeout_s))
        return ToolResult(success=True, output="hi\n", metadata={"slot_id": "slot_0"})

    def cancel_task(self, task: Any, reason: str) -> None:
        raise AssertionError("no client went away")


class App:
    """The framework behind the route: records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.bodies.append((await receive()).get("body", b""))
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await send({"type": "http.response.body", "body": b"from the app"})


def request(route: ExecuteRoute, body: bytes, path: str = "/execute") -> tuple[int, bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    run(route(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:])


def test_a_well_formed_call_is_run_and_answered_without_the_app() -> None:
    executor, app = FakeExecutor(), App()
    route = ExecuteRoute(app, cast(Executor, executor))
    body = {"trajectory_id": "t1", "tool": {"name": "terminal", "arguments": {"command": "ls"}}}
    status, answer = request(route, json.dumps(body).encode())
    assert status == 200
    assert executor.calls == [("t1", "terminal", None)]
    assert app.bodies == []
    assert json.loads(answer) == ToolResult(
        success=True, output="hi\n", metadata={"slot_id": "slot_0"}
    ).model_dump(mode="json")


def test_a_body_that_does_not_validate_reaches_the_app_with_its_body() -> None:
    executor, app = FakeExecutor(), App()
    route = ExecuteRoute(app, cast(Executor, executor))
    status, answer = request(route, b'{"trajectory_id": ""}')
    assert (status, answer) == (422, b"from the app")
    assert app.bodies == [b'{"trajectory_id": ""}']
    assert executor.calls == []


def test_other_routes_reach_the_app() -> None:
    app = App()
    route = ExecuteRoute(app, cast(Executor, FakeExecutor()))
    assert request(route, b"{}", path="/release")[0] == 422
    assert app.bodies == [b"{}"]


def test_a_refused_call_answers_the_services_error() -> None:
    route = ExecuteRoute(App(), cast(Executor, FakeExecutor(refuse=True)))
    body = {"trajectory_id": "t1", "tool": {"name": "terminal", "arguments": {"command": "ls"}}}
    status, answer = request(route, json.dumps(body).encode())
    assert status == 503
    error = json.loads(answer)
    assert "retry shortly" in error["error"]
    assert error["error_kind"] == "overloaded" and error["retryable"] is True
