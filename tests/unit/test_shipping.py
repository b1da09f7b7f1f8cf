"""Layers reaching sandboxes (``executor/shipping.py``) against in-memory layer stores.

The real service is in tests/test_workspaces.py; these pin the rules that are hard to provoke
there: one send per sandbox however many slots ask at once, a layer evicted after its send is
sent again, a snapshot travels from the sandbox that holds it, a failed send is not remembered.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from atropos_agent.errors import MissingLayers, SandboxUnavailable
from atropos_agent.executor.backends.base import SandboxInfo
from atropos_agent.executor.batcher import Batcher
from atropos_agent.executor.leases import Lease, PoolSandbox
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.settings import JournalSettings, WorkspaceSettings
from atropos_agent.executor.shipping import Shipping
from atropos_agent.executor.templates import Template, TemplateRegistry
from atropos_agent.executor.transport import Handler, MockResponse, MockTransport, Request
from atropos_agent.sandbox.protocol import WORKSPACES_VERSION
from tests.unit.fakes import TOKEN, run
from tests.workspace_support import file, tgz

SNAPSHOT = "snap-" + "0" * 32


@dataclass
class LayerStore:
    """A sandbox's layer routes: PUT and GET /layers/{id}, POST /slots/{id}/workspace."""

    url: str
    layers: dict[str, bytes] = field(default_factory=dict)
    puts: Counter[str] = field(default_factory=Counter)
    started: dict[str, list[str]] = field(default_factory=dict)
    failing_puts: int = 0

    async def handle(self, request: Request) -> MockResponse:
        path = request.url.removeprefix(self.url)
        if path.startswith("/layers/"):
            layer_id = path.removeprefix("/layers/")
            if request.method == "GET":
                if layer_id not in self.layers:
                    return MockResponse(404, b'{"error": "unknown layer"}')
                return MockResponse(200, self.layers[layer_id])
            assert request.stream is not None  # archives are streamed, never held whole
            data = b"".join([chunk async for chunk in request.stream])
            await asyncio.sleep(0.01)  # a send takes time: others ask meanwhile
            self.puts[layer_id] += 1
            if self.failing_puts:
                self.failing_puts -= 1
                return MockResponse(500, b'{"error": "disk full"}')
            created = layer_id not in self.layers
            self.layers[layer_id] = data
            answer = {"layer_id": layer_id, "bytes": len(data), "created": created}
            return MockResponse(200, json.dumps(answer).encode())
        slot_id = path.split("/")[2]
        layers = json.loads(request.body or b"")["layers"]
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            answer = {"error": "missing layers", "missing": missing}
            return MockResponse(409, json.dumps(answer).encode())
        self.started[slot_id] = layers
        return MockResponse(200, json.dumps({"slot_id": slot_id}).encode())


def sandbox(store: LayerStore, index: int, handler: Handler | None = None) -> PoolSandbox:
    client = SandboxClient(store.url, MockTransport(handler or store.handle), TOKEN)
    slots = [f"slot_{n}" for n in range(16)]
    return PoolSandbox(
        SandboxInfo(f"sandbox-{index}", store.url, index),
        client,
        Batcher(client, 0.0, 10),
        slots,
        list(slots),
        instance_id=f"instance-{index}",
        protocol_version=WORKSPACES_VERSION,
    )


@pytest.fixture
def registry(tmp_path: Path) -> TemplateRegistry:
    settings = WorkspaceSettings(JournalSettings(tmp_path, "unit"), 1 << 20, 100)
    opened = TemplateRegistry(settings)
    opened.open()
    return opened


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def template_in(registry: TemplateRegistry) -> Template:
    return run(registry.add("repo", chunks(tgz(file("a.txt", b"a")))))


def test_sixteen_slots_asking_at_once_make_one_send(registry: TemplateRegistry) -> None:
    template = template_in(registry)
    store = LayerStore("http://sandbox-0")
    target = sandbox(store, 0)
    shipping = Shipping(registry)
    leases = [Lease(f"t{n}", target, f"slot_{n}") for n in range(16)]

    async def all_at_once() -> None:
        await asyncio.gather(*(shipping.start(lease, [template.layer_id]) for lease in leases))

    run(all_at_once())
    assert store.puts == {template.layer_id: 1}
    assert len(store.started) == 16
    assert shipping.describe()["layers_sent_by_sandbox"] == {"sandbox-0": 1}
    assert shipping.describe()["bytes_sent"] == template.bytes

    # Evicted by the sandbox since: found missing by a later request, so sent again.
    del store.layers[template.layer_id]
    run(shipping.start(Lease("t16", target, "slot_0"), [template.layer_id]))
    assert store.puts == {template.layer_id: 2}


def test_a_snapshot_travels_from_the_sandbox_that_holds_it(registry: TemplateRegistry) -> None:
    template = template_in(registry)
    source_store, target_store = LayerStore("http://sandbox-0"), LayerStore("http://sandbox-1")
    source_store.layers[SNAPSHOT] = b"snapshot bytes"
    source, target = sandbox(source_store, 0), sandbox(target_store, 1)
    shipping = Shipping(registry)
    layers = [SNAPSHOT, template.layer_id]
    run(shipping.start(Lease("fork", target, "slot_3"), layers, origin=source))
    assert target_store.layers[SNAPSHOT] == b"snapshot bytes"
    assert target_store.started == {"slot_3": layers}
    # Without a sandbox that holds it, a snapshot cannot be had: said so, nothing started.
    with pytest.raises(SandboxUnavailable, match="neither the template registry"):
        run(
            shipping.start(Lease("x", sandbox(LayerStore("http://sandbox-2"), 2), "slot_0"), layers)
        )


def test_a_failed_send_is_not_remembered(registry: TemplateRegistry) -> None:
    template = template_in(registry)
    store = LayerStore("http://sandbox-0", failing_puts=1)
    target = sandbox(store, 0)
    shipping = Shipping(registry)
    with pytest.raises(SandboxUnavailable, match="disk full"):
        run(shipping.start(Lease("t0", target, "slot_0"), [template.layer_id]))
    assert store.started == {}
    run(shipping.start(Lease("t1", target, "slot_1"), [template.layer_id]))
    assert store.started == {"slot_1": [template.layer_id]}


def test_a_sandbox_that_keeps_refusing_is_an_error(registry: TemplateRegistry) -> None:
    """A sandbox that still lacks a layer right after receiving it: no endless loop."""
    template = template_in(registry)
    store = LayerStore("http://sandbox-0")
    original = store.handle

    async def forgetful(request: Request) -> MockResponse:
        answer = await original(request)
        store.layers.clear()
        return answer

    target = sandbox(store, 0, forgetful)
    with pytest.raises(MissingLayers) as missing:
        run(Shipping(registry).start(Lease("t0", target, "slot_0"), [template.layer_id]))
    assert missing.value.missing == [template.layer_id]
