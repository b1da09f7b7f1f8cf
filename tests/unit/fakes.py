"""In-memory sandboxes behind the executor's transport seam, for unit tests of its logic.

``FakeSandbox`` answers the sandbox protocol (``atropos_agent/sandbox/protocol.py``) the way the
real server does: calls of one slot run in order, slots in parallel, each result streamed as
soon as it is ready, ``/reset`` empties a slot. Its "commands" are tiny: ``echo TEXT``,
``sleep SECONDS``, ``fail``; a test can also hold a command until it releases it.
``FakeBackend`` lists such sandboxes and scales them. End-to-end tests use the real processes;
these exist so that pool, batcher and executor rules are checked in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from atropos_agent.errors import SandboxUnavailable
from atropos_agent.executor.backends.base import Backend, SandboxInfo
from atropos_agent.executor.settings import PoolSettings
from atropos_agent.executor.transport import MockResponse, MockTransport, Request
from atropos_agent.sandbox.protocol import (
    PROTOCOL_VERSION,
    BatchItem,
    BatchResult,
    SandboxHealth,
    SlotRequest,
    SlotsResponse,
    SlotState,
    StreamedResult,
)

TOKEN = "unit-token"
T = TypeVar("T")


@dataclass
class FakeSandbox:
    url: str
    slots: int = 2
    instance_id: str = "instance-1"
    protocol_version: int = PROTOCOL_VERSION
    # False: every request fails as a dead sandbox's would.
    answering: bool = True
    # Commands named here wait until the test sets the event.
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    batches: list[list[BatchItem]] = field(default_factory=list)
    # (slot_id, command) in the order commands started.
    started: list[tuple[str, str]] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    failing_resets: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    locks: dict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    def slot_ids(self) -> list[str]:
        return [f"slot_{i}" for i in range(self.slots)]

    async def handle(self, request: Request) -> MockResponse:
        if not self.answering:
            raise SandboxUnavailable(f"sandbox at {self.url} did not answer: refused")
        assert request.headers.get("Authorization") in (None, f"Bearer {TOKEN}")
        path = request.url.removeprefix(self.url)
        if path == "/health":
            return json_answer(self.health())
        if path == "/slots":
            states = [SlotState(slot_id=s, calls=self.calls[s]) for s in self.slot_ids()]
            return json_answer(SlotsResponse(slots=states).model_dump())
        if path == "/reset":
            slot_id = SlotRequest.model_validate_json(request.body or b"").slot_id
            if slot_id in self.failing_resets:
                return MockResponse(500, b'{"error": "reset failed"}')
            self.resets.append(slot_id)
            self.calls[slot_id] = 0
            return json_answer({"status": "ok", "slot_id": slot_id})
        if path == "/batch/stream":
            items = [BatchItem.model_validate(raw) for raw in json.loads(request.body or b"")]
            self.batches.append(items)
            return MockResponse(200, stream=self.stream(items))
        return MockResponse(404, b'{"error": "no such route"}')

    def health(self) -> dict[str, Any]:
        return SandboxHealth(
            status="ok",
            slots=self.slots,
            busy_slots=0,
            isolation="bwrap",
            network=True,
            version="test",
            protocol_version=self.protocol_version,
            instance_id=self.instance_id,
        ).model_dump()

    async def stream(self, items: list[BatchItem]) -> AsyncIterator[bytes]:
        done: asyncio.Queue[StreamedResult] = asyncio.Queue()

        async def run_slot(slot_id: str, indexes: list[int]) -> None:
            async with self.locks[slot_id]:
                for index in indexes:
                    result = await self.run(items[index])
                    await done.put(StreamedResult(index=index, **result.model_dump()))

        by_slot: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_slot[item.slot_id].append(index)
        tasks = [asyncio.create_task(run_slot(s, i)) for s, i in by_slot.items()]
        try:
            for _ in items:
                result = await done.get()
                if not self.answering:
                    raise SandboxUnavailable(f"sandbox at {self.url} died mid-batch")
                yield result.model_dump_json().encode() + b"\n"
        finally:
            for task in tasks:
                task.cancel()

    async def run(self, item: BatchItem) -> BatchResult:
        command = str(item.args.get("command", ""))
        self.started.append((item.slot_id, command))
        self.calls[item.slot_id] += 1
        if command in self.gates:
            await self.gates[command].wait()
        verb, _, rest = command.partition(" ")
        if verb == "sleep":
            await asyncio.sleep(float(rest))
        if verb == "fail":
            return BatchResult(success=False, error="Exit code: 1")
        output = rest + "\n" if verb == "echo" else ""
        return BatchResult(success=True, output=output, uniq_id=item.uniq_id)


def json_answer(body: dict[str, Any]) -> MockResponse:
    return MockResponse(200, json.dumps(body).encode())


class FakeCluster:
    """Every fake sandbox, reachable through one MockTransport by URL."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.transport = MockTransport(self.handle)

    def add(self, url: str, **options: Any) -> FakeSandbox:
        sandbox = self.sandboxes[url] = FakeSandbox(url, **options)
        return sandbox

    async def handle(self, request: Request) -> MockResponse:
        for url, sandbox in self.sandboxes.items():
            if request.url.startswith(url + "/"):
                return await sandbox.handle(request)
        raise SandboxUnavailable(f"nothing listens at {request.url}")


class FakeBackend(Backend):
    """Sandboxes of a FakeCluster, started and stopped on request."""

    name = "fake"

    def __init__(self, cluster: FakeCluster, slots: int = 2) -> None:
        self.cluster = cluster
        self.slots = slots
        self.token = TOKEN
        self.listed: dict[str, SandboxInfo] = {}
        self.scale_requests: list[int] = []
        self.replaced: list[str] = []
        self.next_index = 0

    def launch(self) -> FakeSandbox:
        index = self.next_index
        self.next_index += 1
        url = f"http://sandbox-{index}"
        self.listed[f"fake-{index}"] = SandboxInfo(f"fake-{index}", url, index)
        return self.cluster.add(url, slots=self.slots)

    async def start(self, count: int) -> None:
        for _ in range(count):
            self.launch()

    async def stop(self) -> None:
        self.listed.clear()

    async def sandboxes(self) -> list[SandboxInfo]:
        return sorted(self.listed.values(), key=lambda info: info.index)

    async def scale(self, count: int, idle: Collection[str]) -> None:
        self.scale_requests.append(count)
        while len(self.listed) < count:
            self.launch()
        for info in sorted(self.listed.values(), key=lambda i: -i.index):
            if len(self.listed) <= count:
                break
            if info.sandbox_id in idle:
                del self.listed[info.sandbox_id]

    async def replace(self, sandbox_id: str) -> None:
        self.replaced.append(sandbox_id)
        self.listed.pop(sandbox_id, None)


def pool_settings(**overrides: Any) -> PoolSettings:
    """Pool settings for unit tests: 2 slots per sandbox, 1..3 sandboxes, fast checks."""
    values: dict[str, Any] = {
        "slots_per_sandbox": 2,
        "min_sandboxes": 1,
        "max_sandboxes": 3,
        "health_interval_s": 3600.0,  # tests drive health checks themselves
        "scale_down_idle_s": 120.0,
        "start_timeout_s": 5.0,
        "batch_window_s": 0.02,
        "max_batch_size": 200,
    }
    values.update(overrides)
    return PoolSettings(**values)


def run(coroutine: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
    """Run one test's coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))
