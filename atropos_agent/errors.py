"""Every error this project raises on purpose: one tree under ``AtroposError``.

Each class knows the HTTP status a server answers it with (``status_code``) and, for the
retryable ones, the ``Retry-After`` seconds; the message says what failed and what to do.
Both servers turn any ``AtroposError`` into ``{"error": message}`` with that status
(``web.install_error_handlers``), so a route never maps errors by hand.

    AtroposError
    ├── RequestRefused          the caller asked for something that cannot be done now
    │   ├── QueueFull               503: too many calls in the service
    │   ├── ShuttingDown            503: the service is stopping; retry on its successor
    │   ├── UnknownTrajectory       404: the trajectory holds no lease
    │   ├── WorkspaceGone           409: the trajectory's lease ended; release it first
    │   ├── TrajectoryBusy          409: a release waited too long for a running call
    │   ├── NoFreeSlot              503: no slot became free within the acquire timeout
    │   ├── UnknownSlot             404: the sandbox has no such slot (/reset, /artifacts/*)
    │   ├── SlotBusy                503: too many calls already wait for one slot
    │   ├── UnknownTemplate         404: no workspace template of that name
    │   ├── WorkspaceConflict       409: the trajectory holds another workspace, or the id is taken
    │   ├── ArchiveRefused          400: an archive holds what a workspace may not hold
    │   └── TooLarge                413: a body or an archive over its size or entry cap
    ├── Unavailable             a part the service depends on failed
    │   ├── BackendError            503: sandboxes cannot be started, found or stopped
    │   ├── SandboxUnavailable      502: a sandbox did not answer, or failed mid-batch
    │   │   ├── ProtocolMismatch        502: a sandbox speaks a protocol this executor cannot
    │   │   └── MissingLayers           502: a sandbox lacks layers a workspace is made of
    │   ├── ExternalToolError       502: the external tool server could not run a call
    │   ├── IsolationUnavailable    500: bubblewrap cannot create a sandbox on this host
    │   └── SandboxStartError       500: a sandbox server or one of its slots cannot start
    └── ExecutorError           (client side) the executor service refused a request
        └── ExecutorUnreachable     503: no answer from an executor (refused, timed out, cut)

The slot agent (``sandbox/agent``) keeps its own ``ToolError``: it runs on the sandbox's
python3, outside this package, and its failures travel as results, not exceptions.
"""

from __future__ import annotations

from typing import ClassVar


class AtroposError(Exception):
    """The root: anything this project raises on purpose."""

    status_code: ClassVar[int] = 500
    # Seconds a client should wait before retrying; None when retrying will not help.
    retry_after: ClassVar[int | None] = None
    # The executor's error kind (docs/executor.md, "Errors a trainer can act on").
    error_kind: ClassVar[str] = "sandbox_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class RequestRefused(AtroposError):
    """The request is valid but cannot be served now; the message says what to do."""

    status_code = 400
    error_kind = "bad_request"


class QueueFull(RequestRefused):
    """More calls are in the service than its queue bound allows."""

    status_code = 503
    retry_after = 1
    error_kind = "overloaded"


class ShuttingDown(RequestRefused):
    """The service is stopping and takes no new calls."""

    status_code = 503
    retry_after = 2
    error_kind = "overloaded"


class UnknownTrajectory(RequestRefused):
    """A release or artifact call named a trajectory that holds no lease."""

    status_code = 404


class WorkspaceGone(RequestRefused):
    """The trajectory's lease ended (lost, expired): it must be released before it starts over."""

    status_code = 409
    error_kind = "workspace_lost"


class TrajectoryBusy(RequestRefused):
    """A release waited for the trajectory's running call longer than it may."""

    status_code = 409


class NoFreeSlot(RequestRefused):
    """No slot became free within the acquire timeout."""

    status_code = 503
    retry_after = 1
    error_kind = "no_slot"


class UnknownSlot(RequestRefused):
    """A sandbox request named a slot the sandbox does not have."""

    status_code = 404


class SlotBusy(RequestRefused):
    """Too many calls are already waiting for one slot."""

    status_code = 503
    retry_after = 1
    error_kind = "overloaded"


class UnknownTemplate(RequestRefused):
    """A request named a workspace template the executor does not have."""

    status_code = 404


class WorkspaceConflict(RequestRefused):
    """A trajectory already holds a workspace other than the one asked for, or a new
    trajectory id (a fork's) already holds a lease."""

    status_code = 409


class ArchiveRefused(RequestRefused):
    """An archive holds an entry a workspace may not: an absolute path, ``..``, a link out of
    the workspace, a device, a hard link to a file not in the archive."""


class TooLarge(RequestRefused):
    """A request body or an archive over its size or entry cap."""

    status_code = 413


class Unavailable(AtroposError):
    """Something the service depends on failed; the message names it."""

    status_code = 503


class BackendError(Unavailable):
    """The backend cannot start, find or stop sandboxes."""


class SandboxUnavailable(Unavailable):
    """A sandbox did not answer: unreachable, refused, or failed mid-batch."""

    status_code = 502


class ProtocolMismatch(SandboxUnavailable):
    """A sandbox speaks a protocol version this executor cannot drive."""


class MissingLayers(SandboxUnavailable):
    """A sandbox lacks workspace layers a slot was to start on (the executor sends them and
    asks again; this reaches a caller only when that failed too)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


class ExternalToolError(Unavailable):
    """The external tool server could not run a call."""

    status_code = 502


class IsolationUnavailable(Unavailable):
    """bubblewrap cannot create a sandbox on this host."""

    status_code = 500


class SandboxStartError(Unavailable):
    """A sandbox server cannot start (data dir, slot uids, python3), or a slot's agent cannot."""

    status_code = 500


class ExecutorError(AtroposError):
    """The executor service answered an HTTP error; ``status`` is its status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ExecutorUnreachable(ExecutorError):
    """(client side) No answer from the executor at ``url``: the connection was refused or
    timed out, or broke before the answer. ``sent`` is False when the request never left (so
    nothing ran); ``timed_out`` when the answer did not come in time."""

    def __init__(self, url: str, message: str, sent: bool, timed_out: bool = False) -> None:
        super().__init__(503, message)
        self.url = url
        self.sent = sent
        self.timed_out = timed_out
