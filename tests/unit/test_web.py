"""The HTTP plumbing of both servers, in process: the I-JSON rule, answers that always encode,
and the backstop for a bug (a JSON 500 that says the connection closes)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.transport import MockResponse, MockTransport, Request
from atropos_agent.sandbox.protocol import BatchResult, SlotArtifactListRequest
from atropos_agent.web import (
    BodyLimitMiddleware,
    SafeJsonAdapter,
    SafeJSONResponse,
    encode_json,
    ijson_problem,
    install_error_handlers,
)
from tests.unit.fakes import run


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "b"}',
        b'{"a": "\\ud83d\\ude00"}',  # a pair: one character beyond U+FFFF
        b'{"a": "\\\\ud800"}',  # an escaped backslash: the text \ud800, not a surrogate
        b'{"a": "NaN and Infinity are words here"}',
        '{"a": "héllo ☃ 😀"}'.encode(),
        b'{"a": ',  # not JSON at all: the route says where it breaks
    ],
)
def test_ijson_accepts(body: bytes) -> None:
    assert ijson_problem(body) is None


@pytest.mark.parametrize(
    "body, problem",
    [
        (b'{"a": "x\\ud800"}', "lone surrogate \\ud800"),
        (b'{"\\udfff": 1}', "lone surrogate \\udfff"),
        (b'{"a": "\\ud83d\\ud83d"}', "lone surrogate \\ud83d"),
        (b'{"a": "x\xed\xa0\x80"}', "not UTF-8 (byte 0xed at offset 8)"),
        (b'{"a": "\xff"}', "not UTF-8 (byte 0xff"),
        (b'{"a": NaN}', "NaN is not a number JSON has"),
        (b"[1, -Infinity]", "-Infinity is not"),
        ('{"a": 1}'.encode("utf-16-le"), "NUL byte"),
    ],
)
def test_ijson_refuses_saying_why(body: bytes, problem: str) -> None:
    found = ijson_problem(body)
    assert found is not None and found.startswith("request body is not I-JSON (RFC 7493): ")
    assert problem in found


def test_encode_json_replaces_lone_surrogates_and_nonfinite_numbers() -> None:
    content = {"path": "f\udcff", "\ud800": ["\udcfe", 1.5, float("nan")], "ok": "é😀"}
    assert encode_json(content) == (
        '{"path":"f\ufffd","\ufffd":["\ufffd",1.5,null],"ok":"é😀"}'.encode()
    )


def test_the_sandbox_s_result_encoder_keeps_a_result_whatever_its_text() -> None:
    encoder: SafeJsonAdapter[BatchResult] = SafeJsonAdapter(BatchResult)
    result = BatchResult(success=True, output="ls: f-\udcff", uniq_id="c1")
    assert (
        encoder.dump_json(result)
        == (
            '{"success":true,"output":"ls: f-\ufffd","error":"","execution_id":"c1","metadata":{}}'
        ).encode()
    )
    plain = BatchResult(success=True, output="é😀")
    assert encoder.dump_json(plain) == encoder.adapter.dump_json(plain)  # the fast path


class Named(BaseModel):
    name: str


def post(routes: dict[str, Any], path: str, body: bytes = b"") -> httpx.Response:
    """POST ``body`` to an app of both servers' plumbing with ``routes``, in process."""
    app = FastAPI(default_response_class=SafeJSONResponse)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=1 << 20)
    for route, endpoint in routes.items():
        app.post(route)(endpoint)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post(
                path, content=body, headers={"Content-Type": "application/json"}
            )

    return run(send())


def test_an_answer_holding_lone_surrogates_is_sent_with_replacement_characters() -> None:
    async def listing() -> Named:
        return Named(name="bad-\udcff")

    response = post({"/list": listing}, "/list")
    assert response.status_code == 200
    assert response.json() == {"name": "bad-\ufffd"}


def test_a_bug_answers_json_500_that_closes_the_connection() -> None:
    async def broken() -> Named:
        raise RuntimeError("a bug")

    response = post({"/broken": broken}, "/broken")
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert response.json()["error"] == "internal error: RuntimeError"


def test_a_body_that_is_not_ijson_never_reaches_the_route() -> None:
    reached: list[Named] = []

    async def route(body: Named) -> Named:
        reached.append(body)
        return body

    routes = {"/named": route}
    response = post(routes, "/named", b'{"name": "x\\ud800"}')
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"]
    assert post(routes, "/named", b'{"name": "x\\ud83d\\ude00"}').json() == {"name": "x😀"}
    assert [body.name for body in reached] == ["x😀"]


def test_a_sandbox_answer_with_lone_surrogate_escapes_is_read_not_lost() -> None:
    """An older sandbox escapes file names that are not UTF-8 as lone surrogates: pydantic's
    parser refuses them; the client reads the answer with U+FFFD rather than failing it."""

    async def answer(request: Request) -> MockResponse:
        entry = b'{"path": "bad-\\udcff", "is_dir": false, "size": 0, "mtime": 1.0}'
        return MockResponse(200, b'{"success": true, "entries": [' + entry + b"]}")

    client = SandboxClient("http://old", MockTransport(answer))
    listing = run(client.list_artifacts(SlotArtifactListRequest(slot_id="slot_0", path=".")))
    assert [entry.path for entry in listing.entries] == ["bad-\ufffd"]
