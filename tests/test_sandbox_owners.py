"""Slot owners through the real server: recorded from an item's ``lease`` or ``POST
/slots/owner``, shown by ``GET /slots``, cleared by ``/reset``; and ``SandboxClient``'s side."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.transport import AiohttpTransport
from atropos_agent.sandbox.protocol import SlotLease
from harness.servers import TOKEN, SandboxServer


def owners(sandbox: SandboxServer) -> dict[str, Any]:
    response = sandbox.client.get("/slots")
    assert response.status_code == 200, response.text
    return {slot["slot_id"]: slot["owner"] for slot in response.json()["slots"]}


def leased_item(slot: str, lease: dict[str, Any] | None, command: str = "true") -> dict[str, Any]:
    item: dict[str, Any] = {"slot_id": slot, "tool": "terminal", "args": {"command": command}}
    if lease is not None:
        item["lease"] = lease
    return item


def execute(sandbox: SandboxServer, item: dict[str, Any]) -> dict[str, Any]:
    response = sandbox.client.post("/execute", json=item)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_an_item_s_lease_becomes_the_slot_s_owner_until_a_reset(sandbox: SandboxServer) -> None:
    first = {"trajectory_id": "traj-a", "group": "step-1", "expires_at": 1_900_000_000.5}
    assert execute(sandbox, leased_item("slot_0", first))["success"]
    assert owners(sandbox) == {"slot_0": first, "slot_1": None, "slot_2": None, "slot_3": None}

    # Items without a lease leave it; a different lease replaces it.
    assert execute(sandbox, leased_item("slot_0", None))["success"]
    assert owners(sandbox)["slot_0"] == first
    second = {"trajectory_id": "traj-b", "group": None, "expires_at": None}
    assert execute(sandbox, leased_item("slot_0", {"trajectory_id": "traj-b"}))["success"]
    assert owners(sandbox)["slot_0"] == second

    assert sandbox.client.post("/reset", json={"slot_id": "slot_0"}).status_code == 200
    assert owners(sandbox)["slot_0"] is None


def test_the_owner_is_recorded_when_the_call_runs_so_a_reset_before_it_keeps_it(
    sandbox: SandboxServer,
) -> None:
    # A reset queued behind a running call runs before a call queued after it: the owner the
    # later call carries is the one that stays.
    lease = {"trajectory_id": "after-reset", "group": None, "expires_at": None}
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(execute, sandbox, leased_item("slot_1", None, "sleep 1"))
        time.sleep(0.2)
        reset = pool.submit(sandbox.client.post, "/reset", json={"slot_id": "slot_1"})
        time.sleep(0.2)
        later = pool.submit(execute, sandbox, leased_item("slot_1", lease, "true"))
        assert busy.result()["success"] and later.result()["success"]
        assert reset.result().status_code == 200
    assert owners(sandbox)["slot_1"] == lease


def test_slots_owner_sets_and_clears_without_running_anything(sandbox: SandboxServer) -> None:
    calls_before = {s["slot_id"]: s["calls"] for s in sandbox.client.get("/slots").json()["slots"]}
    lease = {"trajectory_id": "no-call", "group": "g", "expires_at": 12.0}
    response = sandbox.client.post("/slots/owner", json={"slot_id": "slot_2", "lease": lease})
    assert response.status_code == 200, response.text
    state = response.json()
    assert state["slot_id"] == "slot_2" and state["owner"] == lease
    assert state["calls"] == calls_before["slot_2"]
    assert owners(sandbox)["slot_2"] == lease

    cleared = sandbox.client.post("/slots/owner", json={"slot_id": "slot_2", "lease": None})
    assert cleared.status_code == 200 and cleared.json()["owner"] is None
    assert owners(sandbox)["slot_2"] is None


def test_slots_owner_refuses_a_bad_request(sandbox: SandboxServer) -> None:
    missing = sandbox.client.post("/slots/owner", json={"slot_id": "slot_2"})
    assert missing.status_code == 422 and "lease" in missing.json()["error"]
    empty = sandbox.client.post(
        "/slots/owner", json={"slot_id": "slot_2", "lease": {"trajectory_id": ""}}
    )
    assert empty.status_code == 422 and "trajectory_id" in empty.json()["error"]
    assert owners(sandbox)["slot_2"] is None


def test_an_item_with_a_bad_lease_fails_alone(sandbox: SandboxServer) -> None:
    items = [
        leased_item("slot_3", {"trajectory_id": "x" * 257}, "echo no"),
        leased_item("slot_3", {"trajectory_id": "ok"}, "echo yes"),
    ]
    results = sandbox.client.post("/batch", json=items).json()
    assert results[0]["success"] is False
    assert results[0]["error"].startswith("Invalid item: lease.trajectory_id"), results[0]
    assert results[1]["success"] and results[1]["output"] == "yes"
    assert owners(sandbox)["slot_3"] == {"trajectory_id": "ok", "group": None, "expires_at": None}


def test_sandbox_client_speaks_the_owner_and_cancel_routes(sandbox: SandboxServer) -> None:
    async def scenario() -> None:
        transport = AiohttpTransport()
        client = SandboxClient(sandbox.url, transport, TOKEN)
        try:
            lease = SlotLease(trajectory_id="via-client", group="g", expires_at=5.0)
            state = await client.set_owner("slot_3", lease)
            assert state.slot_id == "slot_3" and state.owner == lease
            slots = {s.slot_id: s for s in await client.slots()}
            assert slots["slot_3"].owner == lease
            _, admitted = await client.admit()
            assert {s.slot_id: s.owner for s in admitted}["slot_3"] == lease
            assert await client.cancel("slot_3") is False  # idle
            assert (await client.set_owner("slot_3", None)).owner is None
        finally:
            await transport.close()

    asyncio.run(scenario())
