"""Per-sandbox batching: calls bound for one sandbox share one HTTP request.

A call to a sandbox with no batch in flight is sent at once (in the same event-loop turn, so
calls submitted together still share a request): batching never adds the window to a lone
call. While a batch is in flight, new calls wait up to ``window`` (or until ``max_size`` have
gathered) and then go as the next batch, concurrently with the one in flight.

Batches use the sandbox's streaming route, so each call's result is handed back as soon as
that call finishes: a slow command in a batch never delays the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger("atropos.executor")

# Time the sandbox gets beyond the longest timeout in a batch before the executor gives up.
SANDBOX_GRACE_S = 30.0


class SandboxCallError(Exception):
    """The sandbox did not answer a call: it is unreachable, or failed mid-batch."""


@dataclass
class PendingCall:
    item: dict[str, Any]
    timeout_s: float
    future: asyncio.Future[dict[str, Any]]


@dataclass
class BatchStats:
    batches: int = 0
    calls: int = 0
    largest: int = 0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=512))

    def record(self, size: int) -> None:
        self.batches += 1
        self.calls += size
        self.largest = max(self.largest, size)
        self.sizes.append(size)

    def describe(self) -> dict[str, Any]:
        recent = list(self.sizes)
        return {
            "batches": self.batches,
            "calls": self.calls,
            "largest_batch": self.largest,
            "mean_batch_recent": round(sum(recent) / len(recent), 2) if recent else 0,
        }


class Batcher:
    def __init__(
        self, url: str, client: aiohttp.ClientSession, token: str, window_s: float, max_size: int
    ) -> None:
        self.url = url.rstrip("/") + "/batch/stream"
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.window_s = window_s
        self.max_size = max_size
        self.pending: list[PendingCall] = []
        self.in_flight = 0
        self.in_flight_calls = 0
        self.timer: asyncio.TimerHandle | None = None
        self.flush_scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()
        self.closed = False

    async def submit(self, item: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Queue one sandbox call and wait for its result."""
        if self.closed:
            raise SandboxCallError("the sandbox is gone")
        loop = asyncio.get_running_loop()
        call = PendingCall(item, timeout_s, loop.create_future())
        self.pending.append(call)
        if len(self.pending) >= self.max_size:
            self._flush()
        elif self.in_flight == 0:
            if not self.flush_scheduled:
                # Same turn of the loop: calls submitted together still share a request.
                self.flush_scheduled = True
                loop.call_soon(self._flush)
        elif self.timer is None:
            self.timer = loop.call_later(self.window_s, self._flush)
        return await call.future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            batch, self.pending = self.pending[: self.max_size], self.pending[self.max_size :]
            self.in_flight += 1
            self.in_flight_calls += len(batch)
            self.stats.record(len(batch))
            task = asyncio.create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[PendingCall]) -> None:
        answered = 0
        try:
            longest = max(call.timeout_s for call in batch)
            timeout = aiohttp.ClientTimeout(sock_connect=10.0, sock_read=longest + SANDBOX_GRACE_S)
            async with self.client.post(
                self.url,
                json=[call.item for call in batch],
                headers=self.headers,
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    body = (await response.read()).decode(errors="replace")[:500]
                    raise SandboxCallError(f"sandbox answered {response.status}: {body}")
                async for line in response.content:
                    if not line.strip():
                        continue
                    result = json.loads(line)
                    call = batch[result.pop("index")]
                    if not call.future.done():
                        call.future.set_result(result)
                    answered += 1
                    self.in_flight_calls -= 1
        except (
            aiohttp.ClientError,
            TimeoutError,
            SandboxCallError,
            ValueError,
            KeyError,
            IndexError,
        ) as exc:
            message = exc if isinstance(exc, SandboxCallError) else f"{type(exc).__name__}: {exc}"
            log.warning("event=batch_failed url=%s error=%s", self.url, message)
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(SandboxCallError(str(message)))
        finally:
            self.in_flight -= 1
            self.in_flight_calls -= len(batch) - answered
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(
                        SandboxCallError("the sandbox closed the batch early")
                    )
            if self.pending and self.in_flight == 0 and self.timer is None:
                self._flush()

    async def close(self) -> None:
        """Fail what is still queued and wait for batches in flight (they have their timeouts)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for call in self.pending:
            if not call.future.done():
                call.future.set_exception(SandboxCallError("the sandbox is gone"))
        self.pending = []
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {
            "in_flight_batches": self.in_flight,
            "in_flight_calls": self.in_flight_calls,
            "queued_calls": len(self.pending),
            **self.stats.describe(),
        }
