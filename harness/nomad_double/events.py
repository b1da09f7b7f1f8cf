"""Task events with Nomad's ``Type`` strings and ``DisplayMessage`` texts.

https://developer.hashicorp.com/nomad/api-docs/allocations#read-allocation (TaskStates.Events)
The display texts follow structs.TaskEvent.PopulateEventDisplayMessage.
"""

from __future__ import annotations

from typing import Any

from .common import Json, go_duration, now_ns

RECEIVED = "Received"
TASK_SETUP = "Task Setup"
STARTED = "Started"
TERMINATED = "Terminated"
RESTARTING = "Restarting"
NOT_RESTARTING = "Not Restarting"
DRIVER_FAILURE = "Driver Failure"
KILLING = "Killing"
KILLED = "Killed"
TEMPLATE = "Template"
SIBLING_FAILED = "Sibling Task Failed"
RESTART_SIGNALED = "Restart Signaled"
SIGNALING = "Signaling"

REASON_WITHIN_POLICY = "Restart within policy"
REASON_DELAY = "Exceeded allowed attempts, applying a delay"


def event(kind: str, display: str, **fields: Any) -> Json:
    """A TaskEvent with every field Nomad serialises, defaults zeroed."""
    base: Json = {
        "Type": kind,
        "Time": now_ns(),
        "Message": "",
        "DisplayMessage": display,
        "Details": {},
        "FailsTask": False,
        "RestartReason": "",
        "SetupError": "",
        "DriverError": "",
        "DriverMessage": "",
        "ExitCode": 0,
        "Signal": 0,
        "KillReason": "",
        "KillTimeout": 0,
        "KillError": "",
        "StartDelay": 0,
        "DownloadError": "",
        "ValidationError": "",
        "DiskLimit": 0,
        "FailedSibling": "",
        "VaultError": "",
        "TaskSignalReason": "",
        "TaskSignal": "",
        "GenericSource": "",
    }
    base.update(fields)
    return base


def received() -> Json:
    return event(RECEIVED, "Task received by client")


def task_setup() -> Json:
    message = "Building Task Directory"
    return event(TASK_SETUP, message, Message=message, Details={"message": message})


def started() -> Json:
    return event(STARTED, "Task started by client")


def terminated(exit_code: int, signal: int) -> Json:
    display = f"Exit Code: {exit_code}"
    if signal:
        display += f", Signal: {signal}"
    details = {"exit_code": str(exit_code), "signal": str(signal), "oom_killed": "false"}
    return event(TERMINATED, display, ExitCode=exit_code, Signal=signal, Details=details)


def restarting(delay_ns: int, reason: str) -> Json:
    return event(
        RESTARTING,
        f"Task restarting in {go_duration(delay_ns)}",
        StartDelay=delay_ns,
        RestartReason=reason,
        Details={"restart_reason": reason, "start_delay": str(delay_ns)},
    )


def not_restarting(reason: str) -> Json:
    return event(
        NOT_RESTARTING,
        reason,
        RestartReason=reason,
        FailsTask=True,
        Details={"restart_reason": reason, "fails_task": "true"},
    )


def driver_failure(error: str) -> Json:
    return event(DRIVER_FAILURE, error, DriverError=error, Details={"driver_error": error})


def killing(timeout_ns: int, reason: str = "") -> Json:
    return event(
        KILLING,
        f"Sent interrupt. Waiting {go_duration(timeout_ns)} before force killing",
        KillTimeout=timeout_ns,
        KillReason=reason,
        Details={"kill_timeout": go_duration(timeout_ns), "kill_reason": reason},
    )


def killed() -> Json:
    return event(KILLED, "Task successfully killed")


def template(message: str) -> Json:
    return event(TEMPLATE, message, Message=message, Details={"message": message})


def sibling_failed(sibling: str) -> Json:
    return event(
        SIBLING_FAILED,
        f"Task's sibling {sibling!r} failed",
        FailedSibling=sibling,
        Details={"failed_sibling": sibling},
    )


def restart_signaled(reason: str) -> Json:
    return event(RESTART_SIGNALED, reason, RestartReason=reason)
