"""What a call answers: the one failure shape, and a command's result read from how it ended.

Every answer is ``{success, output, error, metadata}``. ``failure()`` is the only place a failed
answer is built, here and in the server (``sandbox/slot.py``, ``sandbox/server.py``);
``cancelled()`` turns the answer of a call the server cancelled into one.

Limits are rlimits, not cgroups (docs/sandbox.md), so a memory or process limit shows only in
what the command reports: its exit status and output. The markers below are those reports.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .config import AgentConfig
    from .output import CommandOutput

MEMORY_MARKERS = (
    b"memoryerror",
    b"cannot allocate memory",
    b"out of memory",
    b"std::bad_alloc",
    b"xmalloc: cannot allocate",
)
PROCESS_MARKERS = (
    b"fork: retry",
    b"fork: resource temporarily unavailable",
    b"cannot fork",
    b"can't fork",
    b"blockingioerror: [errno 11] resource temporarily unavailable",
)
FILE_SIZE_MARKERS = (b"file too large", b"file size limit exceeded")
MIB = 1024 * 1024
# The error of a call the server cancelled while it ran (``processes.Runner.cancelled``).
CANCELLED = "cancelled: the call was stopped before it finished"


class ToolError(Exception):
    """A failure the caller can act on; becomes ``success: false`` with this message."""


def failure(message: str, **metadata: Any) -> dict[str, Any]:
    return {"success": False, "output": "", "error": message, "metadata": metadata}


def cancelled(answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` of a call that was cancelled: failed and marked so, its output kept. An error
    that already says it was cancelled (and what became of the tool's state) stays."""
    error = answer.get("error") or ""
    metadata = {**(answer.get("metadata") or {}), "cancelled": True}
    return {
        **answer,
        "success": False,
        "error": error if error.startswith(CANCELLED) else CANCELLED,
        "metadata": metadata,
    }


def limits_seen(
    output: CommandOutput, exit_code: int | None, killed: int, config: AgentConfig
) -> list[str]:
    """Limits a finished command shows it hit, from its output (both streams) and its end."""
    seen = ["output"] if output.truncated else []
    if exit_code not in (0, None) or killed:
        lowered = output.lowered()
        if any(marker in lowered for marker in MEMORY_MARKERS):
            seen.append("memory")
        # A fork bomb's kill reaches about the whole process limit.
        if killed >= config.max_processes - 2 or any(m in lowered for m in PROCESS_MARKERS):
            seen.append("processes")
        if any(marker in lowered for marker in FILE_SIZE_MARKERS):
            seen.append("disk")
    return seen


def command_result(
    output: CommandOutput,
    exit_code: int | None,
    limit_hit: list[str],
    killed: int,
    started: float,
    config: AgentConfig,
    timeout: float | None = None,
    was_cancelled: bool = False,
) -> dict[str, Any]:
    """The answer to a command, in the old service's shape with ours beside it.

    ``exit_code`` is None when the command was killed for a limit or a cancel (reported as
    ``-1``, as the old service did); ``timeout`` is the one asked for, named in the timeout's
    error.
    """
    metadata: dict[str, Any] = {
        "exit_code": -1 if exit_code is None else exit_code,
        "sandboxed": config.sandboxed,
        "network_isolated": config.network_isolated,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "truncated": output.truncated,
        "output_bytes": output.total,
    }
    if output.stderr is not None:
        metadata["stdout_bytes"] = output.stdout.total
        metadata["stderr_bytes"] = output.stderr.total
    if exit_code is not None and exit_code < 0:
        # Killed by a signal: reported as a shell would ($? = 128 + signal).
        metadata["signal"] = -exit_code
        metadata["exit_code"] = 128 - exit_code
    if killed:
        metadata["killed_processes"] = killed
    limit_hit = sorted(set(limit_hit))
    if limit_hit:
        metadata["limit_hit"] = limit_hit
    error = ""
    if was_cancelled:
        metadata["cancelled"] = True
        error = CANCELLED
    elif "timeout" in limit_hit:
        metadata["timeout"] = True
        metadata["timed_out"] = True
        asked = timeout if timeout is not None else metadata["duration_ms"] / 1000
        error = f"Command timed out after {asked:g}s"
    elif "disk" in limit_hit:
        error = (
            f"workspace disk limit of {config.disk_bytes // MIB} MiB exceeded; "
            "every process of the slot was stopped; delete files to continue"
        )
    elif metadata["exit_code"] != 0:
        error = f"Exit code: {metadata['exit_code']}"
    if "memory" in limit_hit:
        error += f" (memory limit of {config.memory_bytes // MIB} MiB per command)"
    if "processes" in limit_hit:
        error += f" (process limit of {config.max_processes} per slot)"
    return {"success": not error, "output": output.text(), "error": error, "metadata": metadata}
