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
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from atropos_agent.errors import SandboxUnavailable
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.sandbox.protocol import BatchItem, BatchResult

log = logging.getLogger("atropos.executor")


@dataclass
class PendingCall:
    item: BatchItem
    future: asyncio.Future[BatchResult]


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
        self,
        sandbox: SandboxClient,
        window_s: float,
        max_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.sandbox = sandbox
        # Told each batch's size as it is sent (the metrics).
        self.on_batch = on_batch
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
        # Calls handed to the batcher and not answered yet, by slot: which slots are executing.
        self.calls_by_slot: Counter[str] = Counter()

    async def submit(self, item: BatchItem) -> BatchResult:
        """Queue one sandbox call and wait for its result; ``SandboxUnavailable`` when the
        sandbox does not answer it."""
        return await self.enqueue(item)

    def enqueue(self, item: BatchItem) -> asyncio.Future[BatchResult]:
        """Queue one sandbox call; its result (or ``SandboxUnavailable``) comes in the future."""
        loop = asyncio.get_running_loop()
        call = PendingCall(item, loop.create_future())
        if self.closed:
            call.future.set_exception(SandboxUnavailable(f"sandbox at {self.sandbox.url} is gone"))
            return call.future
        self.calls_by_slot[item.slot_id] += 1
        call.future.add_done_callback(lambda _: self._answered(item.slot_id))
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
        return call.future

    def _answered(self, slot_id: str) -> None:
        self.calls_by_slot[slot_id] -= 1
        if self.calls_by_slot[slot_id] <= 0:
            del self.calls_by_slot[slot_id]

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
            if self.on_batch is not None:
                self.on_batch(len(batch))
            task = asyncio.create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[PendingCall]) -> None:
        answered = 0
        try:
            results = self.sandbox.stream_batch([call.item for call in batch])
            async with contextlib.aclosing(results):
                async for result in results:
                    if not 0 <= result.index < len(batch):
                        raise SandboxUnavailable(
                            f"sandbox at {self.sandbox.url} answered item {result.index} "
                            f"of a batch of {len(batch)}"
                        )
                    call = batch[result.index]
                    if not call.future.done():
                        call.future.set_result(result)
                    answered += 1
                    self.in_flight_calls -= 1
        except SandboxUnavailable as exc:
            log.warning("event=batch_failed url=%s error=%s", self.sandbox.url, exc.message)
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(SandboxUnavailable(exc.message))
        except Exception:
            # A fault of ours, not the sandbox's: logged here, since nobody awaits this task;
            # its calls still get an answer below.
            log.exception("event=batch_error url=%s", self.sandbox.url)
        finally:
            self.in_flight -= 1
            self.in_flight_calls -= len(batch) - answered
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(
                        SandboxUnavailable(
                            f"sandbox at {self.sandbox.url} closed the batch before answering"
                        )
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
                call.future.set_exception(
                    SandboxUnavailable(f"sandbox at {self.sandbox.url} is gone")
                )
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
