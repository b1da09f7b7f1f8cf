"""HTTP plumbing shared by the executor service and the sandbox server.

Bearer-token auth, a request-size cap and the I-JSON rule for bodies, as plain ASGI middleware
so that they run before any body is parsed; JSON answers that can always be encoded; error
answers, with a last-resort handler that never drops a keep-alive connection silently; the
``GET /metrics`` answer of both.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atropos_agent.errors import AtroposError, TooLarge

log = logging.getLogger("atropos.web")

# ---------------------------------------------------------------- text that can be sent

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD.

    A Python str can hold them (``os.listdir`` gives them for file names that are not UTF-8,
    ``json.loads`` for an escaped ``\\ud800``); UTF-8 cannot, so they are replaced as invalid
    bytes of output are. Only called once encoding failed: the common case never walks.
    """
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_lone_surrogates(item) for item in value]
    return value


def encode_json(content: Any) -> bytes:
    """``content`` (JSON-compatible values) as compact UTF-8 JSON, whatever its text holds.

    Non-finite floats become null (I-JSON has no NaN); lone surrogates become U+FFFD.
    """
    try:
        return pydantic_core.to_json(content, inf_nan_mode="null")
    except pydantic_core.PydanticSerializationError:
        return pydantic_core.to_json(without_lone_surrogates(content), inf_nan_mode="null")


T = TypeVar("T")


class SafeJsonAdapter(Generic[T]):
    """``TypeAdapter(kind).dump_json``, pydantic-core's fast path, that never fails on text.

    For answers a server encodes itself (the sandbox's results and stream lines): on a string
    UTF-8 cannot hold, the value is encoded again through ``encode_json``.
    """

    def __init__(self, kind: Any) -> None:
        self.adapter: TypeAdapter[T] = TypeAdapter(kind)

    def dump_json(self, value: T) -> bytes:
        try:
            return self.adapter.dump_json(value)
        except pydantic_core.PydanticSerializationError:
            return encode_json(self.adapter.dump_python(value, mode="json"))


class SafeJSONResponse(JSONResponse):
    """The default response class of both servers: an answer that always encodes.

    Serialised by pydantic-core (faster than ``json.dumps``); a string that UTF-8 cannot hold
    is sent with U+FFFD in place of its lone surrogates rather than turned into a 500, so a
    result that was computed is never lost to its encoding.
    """

    def render(self, content: Any) -> bytes:
        return encode_json(content)


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    body = {"error": message, "detail": message, **extra}
    return SafeJSONResponse(body, status, headers=headers)


# ---------------------------------------------------------------- I-JSON bodies

# Bytes where something I-JSON (RFC 7493) forbids may start: N(aN), I(nfinity), a backslash
# (an escaped surrogate), a NUL (never in UTF-8 JSON text; json.loads would take a body with
# NULs for UTF-16 or UTF-32). Deleting every other byte leaves nothing of most bodies.
OTHER_BYTES = bytes(set(range(256)) - set(b"NI\\\x00"))
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
NOT_IJSON = "request body is not I-JSON (RFC 7493): "


class NonFiniteNumber(ValueError):
    pass


def refuse_constant(name: str) -> Any:
    raise NonFiniteNumber(name)


def ijson_problem(body: bytes) -> str | None:
    """Why ``body`` is not I-JSON, or None: UTF-8, no lone surrogate, no NaN or Infinity.

    Paired surrogate escapes (``"\\ud83d\\ude00"``, as ``ensure_ascii`` clients send emoji)
    are fine. A body that is not JSON at all is left to the route, which says where it breaks.
    Cheap for the common case (about a microsecond for a call): a scan or two of the bytes;
    only a suspect body is parsed.
    """
    if not body.isascii():
        try:
            # Strict UTF-8: invalid bytes and UTF-8-encoded surrogates (ED A0..BF xx) both fail.
            body.decode()
        except UnicodeDecodeError as exc:
            return NOT_IJSON + f"not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
    if not body.translate(None, OTHER_BYTES):
        return None
    if (
        b"NaN" not in body
        and b"Infinity" not in body
        and b"\x00" not in body
        and (b"\\u" not in body or SURROGATE_ESCAPE.search(body) is None)
    ):
        return None
    if b"\x00" in body:
        return NOT_IJSON + (
            "it holds a NUL byte (JSON text is UTF-8, not UTF-16 or UTF-32; "
            "a NUL in a string is written \\u0000)"
        )
    try:
        # Decoded pairs are one character: any surrogate left in the text stood alone.
        text = json.dumps(json.loads(body, parse_constant=refuse_constant), ensure_ascii=False)
    except NonFiniteNumber as exc:
        return NOT_IJSON + f"{exc} is not a number JSON has"
    except (ValueError, RecursionError):
        return None  # not JSON: the route's parser answers, saying where it breaks
    found = LONE_SURROGATE.search(text)
    if found is not None:
        return NOT_IJSON + (
            f"a string holds the lone surrogate \\u{ord(found.group()):04x} "
            "(text must be valid Unicode; a character beyond U+FFFF is escaped as a pair)"
        )
    return None


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


@dataclass(frozen=True)
class BodyRule:
    """A route whose body has a cap of its own (``max_bytes``) instead of the server's.

    A ``raw`` body (an archive, not JSON) is not read here: its route reads it as it arrives
    (to stream it on), and a read beyond the cap raises ``TooLarge`` there (413).
    """

    method: str
    # Matched against the whole request path.
    path: re.Pattern[str]
    max_bytes: int
    raw: bool = False

    def matches(self, scope: Scope) -> bool:
        return scope["method"] == self.method and self.path.fullmatch(scope["path"]) is not None


def capped(receive: Receive, max_bytes: int) -> Receive:
    """``receive``, raising ``TooLarge`` once the body read exceeds ``max_bytes``."""
    size = 0

    async def receive_capped() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > max_bytes:
            raise TooLarge(f"request body exceeds the {max_bytes}-byte limit")
        return message

    return receive_capped


class BodyLimitMiddleware:
    """Reads the body once, before the application parses any of it: 413 for a body over
    ``max_bytes`` (or its route's ``BodyRule``), 400 for one that is not I-JSON
    (``ijson_problem``). Raw bodies of a rule are counted as their route reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int, rules: Sequence[BodyRule] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.rules = tuple(rules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = next((rule for rule in self.rules if rule.matches(scope)), None)
        max_bytes = self.max_bytes if rule is None else rule.max_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self.too_large(scope, receive, send, max_bytes)
            return
        if rule is not None and rule.raw:
            await self.app(scope, capped(receive, max_bytes), send)
            return
        if b"json" not in headers.get(b"content-type", b""):
            # Every body here is JSON: `curl -d` (sent as a form) should work all the same.
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
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
            if size > max_bytes:
                await self.too_large(scope, receive, send, max_bytes)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = ijson_problem(body) if body else None
        if problem is not None:
            await error_response(400, problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        response = error_response(
            413, f"request body exceeds the {max_bytes}-byte limit", limit=max_bytes
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
    return error_response(
        422, message, errors=jsonable(errors), error_kind="bad_request", retryable=False
    )


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def atropos_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AtroposError)
    return error_response(
        exc.status_code,
        exc.message,
        headers=exc.headers(),
        error_kind=exc.error_kind,
        retryable=exc.retry_after is not None,
    )


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


async def too_deep(request: Request, exc: Exception) -> JSONResponse:
    """Python's parser and encoders recurse: a body nested past the interpreter's recursion
    limit (``[[[[...]]]]``) is the only way a request reaches one, so it is the caller's."""
    return error_response(400, "request body is nested too deeply")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """The backstop for a bug: a JSON 500 that closes the connection, never silence.

    Starlette re-raises the exception after this answer, so the server logs its traceback
    and then closes the connection; ``Connection: close`` tells the client so, and its next
    request opens a new one instead of being lost on a dead one.
    """
    name = type(exc).__name__
    log.error(
        "event=internal_error method=%s path=%s error=%s", request.method, request.url.path, name
    )
    return error_response(
        500, f"internal error: {name}", path=request.url.path, headers={"Connection": "close"}
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(AtroposError, atropos_error)
    app.add_exception_handler(RecursionError, too_deep)
    app.add_exception_handler(Exception, internal_error)


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


# ---------------------------------------------------------------- metrics


def metrics_response(registry: CollectorRegistry, accept: str | None) -> Response:
    """``registry`` in the format the scraper asks for (OpenMetrics, else Prometheus text)."""
    encode, content_type = choose_encoder(accept or "")
    return Response(encode(registry), media_type=content_type)
