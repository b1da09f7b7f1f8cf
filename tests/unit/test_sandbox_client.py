"""SandboxClient through the transport seam: admission, errors, waiting for a start."""

from __future__ import annotations

import json
from typing import Any

import pytest

from atropos_agent.errors import ProtocolMismatch, SandboxUnavailable
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.transport import MockResponse, MockTransport, Request, unreachable
from atropos_agent.sandbox.protocol import PROTOCOL_VERSION, SlotArtifactReadRequest, SlotLease
from tests.unit.fakes import TOKEN, FakeCluster, run


def test_admit_reads_health_and_slots_with_the_token() -> None:
    cluster = FakeCluster()
    sandbox = cluster.add("http://sandbox-0", slots=3, instance_id="abc")
    sandbox.calls["slot_1"] = 4
    health, slots = run(SandboxClient(sandbox.url, cluster.transport, TOKEN).admit())
    assert health.instance_id == "abc" and health.protocol_version == PROTOCOL_VERSION
    assert [(s.slot_id, s.calls) for s in slots] == [("slot_0", 0), ("slot_1", 4), ("slot_2", 0)]


def test_admit_refuses_a_sandbox_of_an_older_protocol_saying_what_to_do() -> None:
    cluster = FakeCluster()
    sandbox = cluster.add("http://old", protocol_version=1)
    with pytest.raises(ProtocolMismatch, match=r"speaks protocol 1.*needs 2.*same release"):
        run(SandboxClient(sandbox.url, cluster.transport).admit())


def test_a_health_answer_without_a_protocol_version_is_protocol_1() -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(
            200,
            b'{"status": "ok", "slots": 4, "busy_slots": 0, '
            b'"isolation": "bwrap", "network": true, "version": "old"}',
        )

    with pytest.raises(ProtocolMismatch, match="protocol 1"):
        run(SandboxClient("http://older", MockTransport(answer)).admit())


def test_an_unexpected_body_is_reported_as_the_sandbox_s_fault() -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(200, b'{"slots": "many"}')

    with pytest.raises(SandboxUnavailable, match="http://odd answered /health"):
        run(SandboxClient("http://odd", MockTransport(answer)).health())


def test_an_error_answer_carries_the_sandbox_s_own_message() -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(404, b'{"error": "unknown slot \'slot_9\'"}')

    client = SandboxClient("http://s", MockTransport(answer))
    with pytest.raises(SandboxUnavailable, match="answered 404: unknown slot 'slot_9'"):
        run(client.read_artifact(SlotArtifactReadRequest(slot_id="slot_9", path="a")))


def test_reset_posts_the_slot_and_fails_clearly_when_the_sandbox_cannot() -> None:
    cluster = FakeCluster()
    sandbox = cluster.add("http://sandbox-0")
    client = SandboxClient(sandbox.url, cluster.transport, TOKEN)
    run(client.reset("slot_1"))
    assert sandbox.resets == ["slot_1"]
    sandbox.failing_resets.add("slot_0")
    with pytest.raises(SandboxUnavailable, match="answered 500: reset failed"):
        run(client.reset("slot_0"))


def test_wait_until_healthy_ends_early_with_the_reason_it_will_never_start() -> None:
    async def nobody(request: Request) -> MockResponse:
        raise SandboxUnavailable("connection refused")

    async def exited() -> str | None:
        return "it exited with status 3"

    client = SandboxClient("http://dead", MockTransport(nobody))
    with pytest.raises(SandboxUnavailable, match="will not start: it exited with status 3"):
        run(client.wait_until_healthy(30.0, exited))


def test_wait_until_healthy_gives_up_after_its_timeout_with_the_last_error() -> None:
    async def nobody(request: Request) -> MockResponse:
        raise SandboxUnavailable("connection refused")

    client = SandboxClient("http://dead", MockTransport(nobody))
    with pytest.raises(SandboxUnavailable, match=r"not healthy after 0.2s \(last: connection"):
        run(client.wait_until_healthy(0.2))


def test_cancel_posts_the_slot_and_reads_whether_a_call_was_stopped() -> None:
    sent: list[Request] = []

    async def answer(request: Request) -> MockResponse:
        sent.append(request)
        return MockResponse(200, b'{"slot_id": "slot_1", "cancelled": true}')

    client = SandboxClient("http://s", MockTransport(answer), TOKEN)
    assert run(client.cancel("slot_1")) is True
    assert (sent[0].method, sent[0].url) == ("POST", "http://s/cancel")
    assert json.loads(sent[0].body or b"") == {"slot_id": "slot_1"}
    assert sent[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_set_owner_sends_the_lease_and_slots_read_owners_back() -> None:
    owners: dict[str, Any] = {}

    async def answer(request: Request) -> MockResponse:
        if request.url.endswith("/slots/owner"):
            body = json.loads(request.body or b"")
            owners[body["slot_id"]] = body["lease"]
            state = {"slot_id": body["slot_id"], "owner": body["lease"]}
            return MockResponse(200, json.dumps(state).encode())
        slots = [{"slot_id": s, "owner": owners.get(s)} for s in ("slot_0", "slot_1")]
        return MockResponse(200, json.dumps({"slots": slots}).encode())

    client = SandboxClient("http://s", MockTransport(answer))
    lease = SlotLease(trajectory_id="t-1", group="run-7", expires_at=1_900_000_000.0)
    state = run(client.set_owner("slot_1", lease))
    assert state.slot_id == "slot_1" and state.owner == lease
    assert owners["slot_1"] == {"trajectory_id": "t-1", "group": "run-7", "expires_at": 1.9e9}
    assert [(s.slot_id, s.owner) for s in run(client.slots())] == [
        ("slot_0", None),
        ("slot_1", lease),
    ]
    assert run(client.set_owner("slot_1", None)).owner is None
    assert owners["slot_1"] is None


def test_a_protocol_2_sandbox_has_no_cancel_route() -> None:
    async def answer(request: Request) -> MockResponse:
        return MockResponse(404, b'{"error": "Not Found"}')

    client = SandboxClient("http://v2", MockTransport(answer))
    with pytest.raises(SandboxUnavailable, match="answered 404: Not Found"):
        run(client.cancel("slot_0"))


def test_a_reset_answered_with_an_empty_body_still_says_why() -> None:
    async def empty(request: Request) -> MockResponse:
        return MockResponse(500, b"")

    client = SandboxClient("http://sandbox-0", MockTransport(empty))
    with pytest.raises(SandboxUnavailable, match=r"answered 500: an empty body$"):
        run(client.reset("slot_0"))


def test_a_bare_timeout_names_its_type_and_the_wait_that_ran_out() -> None:
    unanswered = unreachable("http://sandbox-0/reset", TimeoutError(), 60.0)
    assert unanswered.message == (
        "sandbox at http://sandbox-0/reset did not answer: TimeoutError: nothing arrived within 60s"
    )
    assert unreachable("http://sandbox-0/reset", OSError()).message.endswith(
        "OSError: no reason given"
    )
