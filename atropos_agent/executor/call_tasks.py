"""The tasks of the calls in the service, so that one can be stopped and say why.

A call is stopped by cancelling its task: by ``POST /cancel``, by its client going away, at
its lease's end, or when a shutdown's grace runs out. The call turns that cancellation into
a result (``Executor._run``) with the reason kept here.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("atropos.executor")

SHUTDOWN = "the executor shut down"


class CallTasks:
    def __init__(self) -> None:
        self.running: set[asyncio.Task[object]] = set()
        self.reasons: dict[asyncio.Task[object], str] = {}
        self.draining = False
        self.drainer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[object]) -> None:
        self.running.add(task)

    def done(self, task: asyncio.Task[object]) -> None:
        self.running.discard(task)
        self.reasons.pop(task, None)

    def cancel(self, task: asyncio.Task[object], reason: str) -> bool:
        """Cancel one call's task (False: not running, or already cancelled)."""
        if task not in self.running or task in self.reasons:
            return False
        self.reasons[task] = reason
        task.cancel(reason)
        return True

    def why_cancelled(self, task: asyncio.Task[object]) -> str | None:
        """Why the task was cancelled by one of ours, ``SHUTDOWN`` included; None when the
        cancellation came from elsewhere (it must then go on)."""
        reason = self.reasons.pop(task, None)
        if reason is None and self.draining:
            reason = SHUTDOWN
        if reason is not None and task.uncancel() > 0:
            return None  # cancelled for another reason as well: let that one win
        return reason

    def begin_shutdown(self, grace_s: float) -> None:
        """From now on, refuse new calls (``draining``); cancel those still running when
        ``grace_s`` has passed."""
        if self.draining:
            return
        self.draining = True
        log.info("event=shutdown_begun calls_in_flight=%d grace_s=%g", len(self.running), grace_s)
        self.drainer = asyncio.get_running_loop().call_later(grace_s, self._end_all)

    def stop(self) -> None:
        if self.drainer is not None:
            self.drainer.cancel()

    def _end_all(self) -> None:
        if self.running:
            log.warning("event=calls_ended_by_shutdown count=%d", len(self.running))
        for task in list(self.running):
            task.cancel(SHUTDOWN)
