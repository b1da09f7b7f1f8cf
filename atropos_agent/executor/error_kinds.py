"""What a failed call's ``metadata.error_kind`` is, and whether retrying it can help.

A trainer tells infrastructure faults from the agent's own failures by this, not by parsing
error text (docs/executor.md, "Errors a trainer can act on"). HTTP errors carry the same two
fields in their JSON body (``errors.AtroposError.error_kind``).
"""

from __future__ import annotations

from typing import Literal

from atropos_agent.models import ToolResult

ErrorKind = Literal[
    "tool_failed",
    "timeout",
    "cancelled",
    "workspace_lost",
    "lease_expired",
    "no_slot",
    "overloaded",
    "sandbox_error",
    "bad_request",
]
# Whether sending the same call again (same uniq_id after a release, or a new one) can succeed.
RETRYABLE: dict[ErrorKind, bool] = {
    "tool_failed": False,
    "timeout": False,
    "cancelled": False,
    "workspace_lost": False,
    "lease_expired": False,
    "no_slot": True,
    "overloaded": True,
    "sandbox_error": True,
    "bad_request": False,
}


def kind_of(metadata: dict[str, object]) -> ErrorKind:
    """The kind of a failed result, from the markers its producer left in ``metadata``."""
    if metadata.get("cancelled"):
        return "cancelled"
    if metadata.get("shutting_down") or metadata.get("sandbox_unavailable"):
        return "sandbox_error"
    if metadata.get("lease_expired"):
        return "lease_expired"
    if metadata.get("workspace_lost"):
        return "workspace_lost"
    if metadata.get("acquire_timeout"):
        return "no_slot"
    if metadata.get("bad_request"):
        return "bad_request"
    if metadata.get("timeout"):
        return "timeout"
    return "tool_failed"


def label(result: ToolResult) -> ToolResult:
    """``result`` with ``error_kind`` and ``retryable`` in its metadata when it failed."""
    if not result.success:
        metadata = result.metadata
        kind = metadata.get("error_kind") or kind_of(metadata)
        metadata["error_kind"] = kind
        metadata.setdefault("retryable", RETRYABLE.get(kind, False))
    return result
