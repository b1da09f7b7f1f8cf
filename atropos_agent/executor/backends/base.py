"""What a backend is: the thing that starts, finds and stops sandboxes.

The pool (``pool.py``) decides *how many* sandboxes there should be and which slots are leased;
a backend only makes the count real (child processes, or allocations of a Nomad job) and
reports which sandboxes are running and where they listen. Failures raise ``BackendError``
(``atropos_agent.errors``) saying why and what to do.
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SandboxInfo:
    """One running sandbox server as the backend sees it.

    ``sandbox_id`` changes whenever the sandbox is replaced (a restarted process, a new Nomad
    allocation), so the pool can tell that the workspaces behind it are gone.
    ``index`` orders sandboxes: leases go to the lowest index first, and shrinking removes
    the highest index first (Nomad stops the highest-index allocations on scale-down).
    """

    sandbox_id: str
    url: str
    index: int


class Backend(abc.ABC):
    name: str
    # The bearer token every sandbox of this backend requires.
    token: str

    @abc.abstractmethod
    async def start(self, count: int) -> None:
        """Bring up ``count`` sandboxes; raise BackendError with the cause if they cannot start."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every sandbox of this backend."""

    @abc.abstractmethod
    async def sandboxes(self) -> list[SandboxInfo]:
        """The sandboxes running now (they may still be starting their slots)."""

    @abc.abstractmethod
    async def scale(self, count: int, idle: Collection[str]) -> None:
        """Aim for ``count`` sandboxes. When shrinking, only sandboxes in ``idle`` may go."""

    @abc.abstractmethod
    async def replace(self, sandbox_id: str) -> None:
        """Stop a sandbox that no longer answers; the backend starts a new one in its place."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}
