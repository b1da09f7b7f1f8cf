"""HTTP plumbing shared by the executor service and the sandbox server.

Bearer-token auth, a request-size cap and JSON error answers, as plain ASGI middleware so that
they run before any body is parsed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atropos_agent.errors import AtroposError


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    return JSONResponse({"error": message, "detail": message, **extra}, status, headers=headers)


class BearerAuthMiddleware:
    """401 when the ``Authorization: Bearer`` header is missing or malformed, 403 when wrong."""

    def __init__(self, app: ASGIApp, token: str | None, open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            response = error_response(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif not hmac.compare_digest(given.strip(), self.token):
            response = error_response(403, "invalid bearer token")
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 for a body over ``max_bytes``, before the application parses any of it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if b"json" not in headers.get(b"content-type", b""):
            # Every body here is JSON: `curl -d` (sent as a form) should work all the same.
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large(scope, receive, send)
            return
        # Without a trustworthy length (chunked bodies), read at most max_bytes, then replay.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"request body exceeds the {self.max_bytes}-byte limit", limit=self.max_bytes
        )
        await response(scope, receive, send)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        problem = next(e for e in errors if e.get("type") == "json_invalid")
        return error_response(
            400, f"malformed JSON body: {problem.get('ctx', {}).get('error', '')}"
        )
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}"
    return error_response(422, message, errors=jsonable(errors))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def atropos_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AtroposError)
    return error_response(exc.status_code, exc.message, headers=exc.headers())


def jsonable(errors: Any) -> Any:
    """Validation errors may carry exception objects in ``ctx``; keep only their text."""
    cleaned = []
    for error in errors:
        error = dict(error)
        if "ctx" in error:
            error["ctx"] = {key: str(value) for key, value in error["ctx"].items()}
        error.pop("input", None)
        cleaned.append(error)
    return cleaned


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(AtroposError, atropos_error)


def describe_settings_error(exc: ValidationError, env_prefix: str) -> str:
    """One line per invalid setting, named as the user sets it (the environment variable)."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across settings: its message names them
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        name = field if field.isupper() else env_prefix + field.upper()
        value = error.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {error['msg']}{shown}")
    return "; ".join(lines)
