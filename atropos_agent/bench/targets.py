"""Where a bench run sends its calls, each answered with an error kind or None (a right answer).

- ``ExecutorTarget``: the executor's own routes, as a trainer calls them: ``POST /execute`` with
  a ``uniq_id`` per call, ``POST /artifacts/archive``, ``POST /release`` when a level ends.
- ``SandboxTarget``: sandbox servers driven directly, each trajectory bound to one slot, through
  the sandbox's ``POST /execute`` and ``/artifacts/archive`` (docs/protocol.md): the same work
  without the executor, its leases and its batching.

Error kinds are the service's (``metadata.error_kind`` of a failed result, or of an HTTP
error's body), else ``tool_failed`` for a failed result that names none, ``http_<status>``,
``transport`` (no answer: connection lost, time out) and ``unexpected_output`` (a successful
answer without the expected output).

One aiohttp session per target: at a thousand concurrent trajectories an httpx pool costs the
load generator a core, and the figures would be the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any

import aiohttp

from atropos_agent.bench.mix import Step

# A call that takes longer than this is counted as a transport error.
CALL_TIMEOUT_S = 300.0
# How long the end of a level waits for the executor to finish resetting released slots.
SETTLE_TIMEOUT_S = 120.0
SETTLE_POLL_S = 0.2


def new_session(base_url: str, token: str | None) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return aiohttp.ClientSession(
        base_url,
        headers=headers,
        # No bound on connections: every trajectory keeps its own, as a trainer's would.
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
    )


async def post(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
    """The answer's JSON; ``CallFailed`` with its error kind when there is no usable answer."""
    try:
        async with session.post(path, data=json.dumps(body), headers=JSON) as response:
            payload = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CallFailed("transport", f"{type(exc).__name__}: {exc}") from None
    try:
        answer = json.loads(payload)
    except ValueError:
        raise CallFailed(f"http_{status}", payload[:200].decode(errors="replace")) from None
    if status >= 400:
        kind = answer.get("error_kind") if isinstance(answer, dict) else None
        raise CallFailed(str(kind or f"http_{status}"), str(answer)[:200])
    return answer


JSON = {"Content-Type": "application/json"}


class CallFailed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def judge(answer: Any, step: Step) -> str | None:
    """The error kind of a result (a ToolResult, a sandbox's result or an artifact answer)."""
    if not isinstance(answer, dict):
        return "unexpected_output"
    if not answer.get("success"):
        metadata = answer.get("metadata")
        kind = metadata.get("error_kind") if isinstance(metadata, dict) else None
        return str(kind or "tool_failed")
    if step.expected is not None and str(answer.get("output", "")).strip() != step.expected:
        return "unexpected_output"
    return None


class Target(ABC):
    """Where calls go; ``trajectory`` is the trajectory's number within the current level."""

    name: str

    def __init__(self) -> None:
        # Unique per run: a call id is never sent twice.
        self.run_id = uuid.uuid4().hex[:8]
        self.call_ids = itertools.count()
        self.concurrency = 0

    def start_level(self, concurrency: int) -> None:
        self.concurrency = concurrency

    async def call(self, trajectory: int, step: Step) -> str | None:
        """Make one call; its error kind, or None when it answered right."""
        try:
            return judge(await self._send(trajectory, step), step)
        except CallFailed as exc:
            return exc.kind

    @abstractmethod
    async def _send(self, trajectory: int, step: Step) -> Any: ...

    @abstractmethod
    async def end_level(self) -> None:
        """Give back what the level held."""

    @abstractmethod
    async def close(self) -> None: ...


class ExecutorTarget(Target):
    name = "executor"

    def __init__(self, url: str, token: str | None) -> None:
        super().__init__()
        self.session = new_session(url, token)

    def trajectory_id(self, trajectory: int) -> str:
        return f"bench-{self.run_id}-{self.concurrency}-{trajectory}"

    async def _send(self, trajectory: int, step: Step) -> Any:
        trajectory_id = self.trajectory_id(trajectory)
        if step.tool is None:
            body = {"trajectory_id": trajectory_id, **step.arguments}
            return await post(self.session, "/artifacts/archive", body)
        tool = {"name": step.tool, "arguments": step.arguments, "uniq_id": str(next(self.call_ids))}
        return await post(self.session, "/execute", {"trajectory_id": trajectory_id, "tool": tool})

    async def end_level(self) -> None:
        """Release every trajectory of the level, then wait until the executor has reset their
        slots, so that the next level starts on a quiet service."""
        await asyncio.gather(
            *(self._release(self.trajectory_id(n)) for n in range(self.concurrency)),
        )
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                async with self.session.get("/status") as response:
                    status = await response.json(content_type=None)
                if not status["pool"]["slots_by_state"].get("releasing"):
                    return
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
                return  # a service that does not say: nothing to wait for
            await asyncio.sleep(SETTLE_POLL_S)

    async def _release(self, trajectory_id: str) -> None:
        # A trajectory whose calls all failed may hold nothing.
        with contextlib.suppress(CallFailed):
            await post(self.session, "/release", {"trajectory_id": trajectory_id})

    async def close(self) -> None:
        await self.session.close()


class SandboxTarget(Target):
    """Trajectory ``n`` runs on slot ``n % slots`` of server ``(n // slots) % len(urls)``: with
    as many slots as trajectories, each has a slot of its own, as through the executor."""

    name = "sandbox"

    def __init__(self, urls: list[str], token: str | None, slots: int) -> None:
        super().__init__()
        self.slots = slots
        self.sessions = [new_session(url, token) for url in urls]

    async def _send(self, trajectory: int, step: Step) -> Any:
        session = self.sessions[(trajectory // self.slots) % len(self.sessions)]
        slot_id = f"slot_{trajectory % self.slots}"
        if step.tool is None:
            return await post(session, "/artifacts/archive", {"slot_id": slot_id, **step.arguments})
        item = {
            "slot_id": slot_id,
            "tool": step.tool,
            "args": step.arguments,
            # A slot answers a repeated id from memory: never repeat one.
            "execution_id": f"bench-{self.run_id}-{next(self.call_ids)}",
        }
        return await post(session, "/execute", item)

    async def end_level(self) -> None:
        pass  # slots are bound to trajectories by number: nothing is held between calls

    async def close(self) -> None:
        await asyncio.gather(*(session.close() for session in self.sessions))


async def sandbox_slots(url: str, token: str | None) -> int:
    """How many slots a sandbox server has (``GET /health``)."""
    async with new_session(url, token) as session, session.get("/health") as response:
        health = await response.json(content_type=None)
    slots = health.get("slots") if isinstance(health, dict) else None
    if not isinstance(slots, int) or slots < 1:
        raise CallFailed("unexpected_output", f"{url}/health names no slot count: {health}")
    return slots
