"""``POST /execute``, the route nearly every request takes, answered without the framework.

FastAPI's routing, dependency solving, validation wrappers and response machinery cost more
CPU per call than the executor's own work on it (docs/benchmarks.md). This ASGI layer sits
inside the shared middleware (auth, body cap, I-JSON: ``web.py``), so those still apply, and
answers a well-formed call itself: the body validated by the same ``ExecuteRequest``, the
result encoded as the route would encode it. Anything else (a body that does not validate,
another route) goes on to the FastAPI app unchanged, so every error reads the same either way.
The route stays declared in ``app.py`` for the OpenAPI schema and for such bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atropos_agent.errors import AtroposError
from atropos_agent.executor.executor import Executor
from atropos_agent.models import ExecuteRequest, ToolResult
from atropos_agent.serving import ON_DISCONNECT
from atropos_agent.web import SafeJsonAdapter, error_response

PATH = "/execute"
JSON_HEADERS = [(b"content-type", b"application/json")]
RESULT: SafeJsonAdapter[ToolResult] = SafeJsonAdapter(ToolResult)


class ExecuteRoute:
    """Answers well-formed ``POST /execute`` calls; passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, executor: Executor) -> None:
        self.app = app
        self.executor = executor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before its body arrived: nobody to answer
        try:
            call = ExecuteRequest.model_validate_json(body)
        except ValidationError:
            # The framework's route says what is wrong, in the words every route uses.
            await self.app(scope, replay(body, receive), send)
            return
        try:
            result = await self.execute(scope, receive, call)
        except AtroposError as exc:
            response = error_response(
                exc.status_code,
                exc.message,
                headers=exc.headers(),
                error_kind=exc.error_kind,
                retryable=exc.retry_after is not None,
            )
            await response(scope, receive, send)
            return
        content = RESULT.dump_json(result)
        headers = [*JSON_HEADERS, (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def execute(self, scope: Scope, receive: Receive, call: ExecuteRequest) -> ToolResult:
        """The call run as the declared route runs it: admitted, cancelled if its client goes
        away (``app.cancel_on_disconnect``)."""
        executor = self.executor
        executor.admit()
        task = asyncio.current_task()

        def cancel() -> None:
            if task is not None:
                executor.cancel_task(task, "the client disconnected before the answer")

        callbacks = scope.get(ON_DISCONNECT)
        watcher = None
        if callbacks is not None:
            callbacks.append(cancel)  # our HTTP protocol calls back: no cost per call
        else:
            watcher = asyncio.ensure_future(watch_disconnect(receive, cancel))
        try:
            return await executor.execute(call.trajectory_id, call.tool, call.timeout_s, call)
        finally:
            if watcher is not None:
                watcher.cancel()


async def read_body(receive: Receive) -> bytes | None:
    """The whole body (the body-limit middleware outside has already capped and replays it in
    one message); None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives ``body`` first, then what the connection sends."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def watch_disconnect(receive: Receive, cancel: Callable[[], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel()
