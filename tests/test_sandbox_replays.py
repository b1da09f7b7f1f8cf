"""A call sent to a slot again under the same execution_id (its executor restarted while it
ran) is answered again from the slot's recent results, not run twice."""

from __future__ import annotations

import threading
import time
from typing import Any

from harness.servers import SandboxServer


def batch(sandbox: SandboxServer, slot: str, command: str, call_id: str) -> dict[str, Any]:
    item = {"slot_id": slot, "tool": "terminal", "args": {"command": command}}
    response = sandbox.client.post("/batch", json=[{**item, "execution_id": call_id}])
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()[0]
    return result


def busy(sandbox: SandboxServer, slot: str) -> bool:
    slots = sandbox.client.get("/slots").json()["slots"]
    return any(entry["slot_id"] == slot and entry["busy"] for entry in slots)


def test_a_call_sent_again_while_it_runs_and_after_runs_once(sandbox: SandboxServer) -> None:
    command = "sleep 1; echo ran >> runs.txt; echo done"
    first: list[dict[str, Any]] = []
    running = threading.Thread(target=lambda: first.append(batch(sandbox, "slot_1", command, "c1")))
    running.start()
    deadline = time.monotonic() + 10
    while not busy(sandbox, "slot_1") and time.monotonic() < deadline:
        time.sleep(0.02)
    again = batch(sandbox, "slot_1", command, "c1")  # queued behind the first in its slot
    running.join(30)
    later = batch(sandbox, "slot_1", command, "c1")
    assert first[0]["output"] == "done" and "replayed" not in first[0]["metadata"]
    for replay in (again, later):
        assert replay["output"] == "done" and replay["metadata"]["replayed"] is True
        assert replay["execution_id"] == "c1"
    assert batch(sandbox, "slot_1", "cat runs.txt", "c2")["output"] == "ran"

    # The same id for another call runs it; a reset forgets every result.
    assert batch(sandbox, "slot_1", "echo other", "c1")["output"] == "other"
    assert sandbox.client.post("/reset", json={"slot_id": "slot_1"}).status_code == 200
    fresh = batch(sandbox, "slot_1", "echo other", "c1")
    assert fresh["output"] == "other" and "replayed" not in fresh["metadata"]
