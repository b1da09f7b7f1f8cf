"""Which executor a trajectory's calls go to: rendezvous hashing, pins, executors marked down.

A trajectory the client has not pinned goes to the executor with the highest rendezvous score
of (executor URL, trajectory id): every client computes the same choice, and adding an executor
takes only the ids that now score highest on it. Once a call that may take the trajectory's
lease was sent, the trajectory is pinned to that executor (its workspace lives there) until it
is released: a change of the executor set never moves it. An executor that refused a
connection is marked down for a while: new trajectories skip it, pinned ones get an error
naming it (their files are not elsewhere).

Pure bookkeeping, no I/O: the client calls it from one event loop, so nothing here locks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

from atropos_agent.errors import ExecutorUnreachable

# How long an executor that refused a connection is skipped before it is tried again.
DOWN_S = 5.0
# Pins kept at most: a trainer that never releases must not grow the client without bound.
# Past it the oldest pin goes; that trajectory is then routed by its hash again, which is
# where it was unless the executor set changed meanwhile.
MAX_PINS = 200_000


def score(url: str, trajectory_id: str) -> int:
    """The rendezvous weight of ``url`` for ``trajectory_id``: a stable hash (the same in
    every process and Python version, unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{url}\n{trajectory_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(urls: Iterable[str], trajectory_id: str) -> list[str]:
    """``urls`` from the first choice for ``trajectory_id`` to the last."""
    return sorted(urls, key=lambda url: score(url, trajectory_id), reverse=True)


def normalized(url: str) -> str:
    return url.rstrip("/")


class Router:
    """The executor set, the pins, and the executors marked down."""

    def __init__(
        self, urls: Iterable[str] = (), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.urls: list[str] = []
        self.clock = clock
        # Trajectory id -> the executor holding its workspace; and its group, when known.
        self.pins: dict[str, str] = {}
        self.groups: dict[str, str] = {}
        # Executor URL -> when it may be tried again.
        self.down_until: dict[str, float] = {}
        self.set_urls(urls)

    def set_urls(self, urls: Iterable[str]) -> None:
        """The executors new trajectories may go to (pins to others stay)."""
        self.urls = list(dict.fromkeys(normalized(url) for url in urls))

    def is_down(self, url: str) -> bool:
        until = self.down_until.get(url)
        if until is None:
            return False
        if self.clock() >= until:
            del self.down_until[url]
            return False
        return True

    def mark_down(self, url: str) -> None:
        self.down_until[url] = self.clock() + DOWN_S

    def up(self) -> list[str]:
        """The executors not marked down, in the order given; all of them if all are down
        (one of them may be back)."""
        return [url for url in self.urls if not self.is_down(url)] or list(self.urls)

    def where(self, trajectory_id: str) -> str:
        """The trajectory's executor: its pin, else its first choice not marked down."""
        pinned = self.pins.get(trajectory_id)
        if pinned is not None:
            return pinned
        order = ranked(self.urls, trajectory_id)
        return next((url for url in order if not self.is_down(url)), order[0])

    def choose(self, trajectory_id: str) -> str:
        """Where the trajectory's next call goes (``where``); a pin on an executor marked
        down raises ``pinned_down`` at once rather than wait for a connection to fail."""
        url = self.where(trajectory_id)
        if trajectory_id in self.pins and self.is_down(url):
            raise pinned_down(trajectory_id, url, "it refused a connection moments ago")
        return url

    def pin(self, trajectory_id: str, url: str, group: str | None = None) -> None:
        self.pins.setdefault(trajectory_id, url)
        if len(self.pins) > MAX_PINS:
            self.unpin(next(iter(self.pins)))
        if group is not None:
            self.groups.setdefault(trajectory_id, group)

    def unpin(self, trajectory_id: str) -> None:
        self.pins.pop(trajectory_id, None)
        self.groups.pop(trajectory_id, None)

    def unpin_group(self, group: str) -> None:
        for trajectory_id in [t for t, g in self.groups.items() if g == group]:
            self.unpin(trajectory_id)


def pinned_down(trajectory_id: str, url: str, why: str) -> ExecutorUnreachable:
    return ExecutorUnreachable(
        url,
        f"trajectory {trajectory_id!r} lives on the executor at {url}, which cannot be reached "
        f"({why}): its workspace is there and nowhere else, so its calls are not sent to "
        "another executor. Retry later, or release it and start the trajectory again.",
        sent=False,
    )
