"""Job JSON: Nomad's canonical defaults, its validation messages, and spec comparison.

Defaults follow hashicorp/nomad ``api/jobs.go`` and ``api/tasks.go`` (Canonicalize), and the
messages follow ``nomad/structs/structs.go`` (Job/TaskGroup/Task Validate).
"""

from __future__ import annotations

import json
from typing import Any

from .common import (
    NS_PER_S,
    Json,
    as_int,
    deep_copy,
    get_dict,
    get_list,
    go_duration,
    multierror,
)

S = NS_PER_S
MINUTE = 60 * S
HOUR = 60 * MINUTE

JOB_TYPES = ("service", "batch", "system", "sysbatch")
RESTART_MIN_INTERVAL = 5 * S
RESCHEDULE_MIN_INTERVAL = 15 * S
RESCHEDULE_MIN_DELAY = 5 * S

# Fields the server owns; they never make a submitted spec "changed".
SERVER_FIELDS = (
    "Status",
    "StatusDescription",
    "Version",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "SubmitTime",
    "Stable",
    "VersionTag",
)


def default_update() -> Json:
    """api.DefaultUpdateStrategy()."""
    return {
        "Stagger": 30 * S,
        "MaxParallel": 1,
        "HealthCheck": "checks",
        "MinHealthyTime": 10 * S,
        "HealthyDeadline": 5 * MINUTE,
        "ProgressDeadline": 10 * MINUTE,
        "AutoRevert": False,
        "AutoPromote": False,
        "Canary": 0,
    }


def default_restart(job_type: str) -> Json:
    """structs.DefaultServiceJobRestartPolicy / DefaultBatchJobRestartPolicy."""
    if job_type in ("service", "system"):
        return {"Attempts": 2, "Interval": 30 * MINUTE, "Delay": 15 * S, "Mode": "fail"}
    return {"Attempts": 3, "Interval": 24 * HOUR, "Delay": 15 * S, "Mode": "fail"}


def default_reschedule(job_type: str) -> Json | None:
    """api.NewDefaultReschedulePolicy; system jobs are never rescheduled."""
    if job_type == "service":
        return {
            "Attempts": 0,
            "Interval": 0,
            "Delay": 30 * S,
            "DelayFunction": "exponential",
            "MaxDelay": HOUR,
            "Unlimited": True,
        }
    if job_type == "batch":
        return {
            "Attempts": 1,
            "Interval": 24 * HOUR,
            "Delay": 5 * S,
            "DelayFunction": "constant",
            "MaxDelay": 0,
            "Unlimited": False,
        }
    return None


def _merge(defaults: Json | None, given: Any) -> Json | None:
    if defaults is None and not isinstance(given, dict):
        return None
    merged = dict(defaults or {})
    if isinstance(given, dict):
        merged.update({k: v for k, v in given.items() if v is not None})
    return merged


def canonicalize(submitted: Json, namespace: str, region: str) -> Json:
    """Fill in the defaults Nomad's API layer adds before the job reaches the server."""
    job: Json = deep_copy(submitted)
    job_type = job.get("Type") or "service"
    job["Type"] = job_type
    job.setdefault("Name", job.get("ID"))
    if not job.get("Name"):
        job["Name"] = job.get("ID")
    job["Namespace"] = job.get("Namespace") or namespace
    job["Region"] = job.get("Region") or region
    job["Priority"] = as_int(job.get("Priority"), 50) or 50
    if job.get("Datacenters") is None:
        job["Datacenters"] = ["*"]
    job["NodePool"] = job.get("NodePool") or "default"
    job.setdefault("AllAtOnce", False)
    job.setdefault("ParentID", "")
    job.setdefault("Meta", None)
    job.setdefault("Constraints", None)
    job["Stop"] = bool(job.get("Stop", False))
    job_update = job.get("Update")
    if isinstance(job_update, dict):
        job_update = _merge(default_update(), job_update)
    elif job_type == "service":
        job_update = default_update()
    job["Update"] = job_update
    job_reschedule = job.get("Reschedule")
    for group in get_list(job, "TaskGroups"):
        if isinstance(group, dict):
            _canonicalize_group(group, job_type, job_update, job_reschedule)
    return job


def _canonicalize_group(group: Json, job_type: str, job_update: Any, reschedule: Any) -> None:
    scaling = group.get("Scaling")
    if group.get("Count") is None:
        group["Count"] = as_int(scaling.get("Min"), 1) if isinstance(scaling, dict) else 1
    if isinstance(scaling, dict):
        scaling.setdefault("Min", group["Count"])
        scaling.setdefault("Type", "horizontal")
        scaling.setdefault("Enabled", True)
        scaling.setdefault("Policy", None)
    group["RestartPolicy"] = _merge(default_restart(job_type), group.get("RestartPolicy"))
    resched = _merge(default_reschedule(job_type), reschedule)
    group["ReschedulePolicy"] = _merge(resched, group.get("ReschedulePolicy"))
    update = group.get("Update")
    if isinstance(job_update, dict):
        group["Update"] = _merge(job_update, update)
    elif isinstance(update, dict):
        group["Update"] = _merge(default_update(), update)
    else:
        group["Update"] = None
    group["EphemeralDisk"] = _merge(
        {"Sticky": False, "Migrate": False, "SizeMB": 300}, group.get("EphemeralDisk")
    )
    networks = []
    for network in get_list(group, "Networks"):
        if isinstance(network, dict):
            network.setdefault("Mode", "host")
            for key in ("DynamicPorts", "ReservedPorts"):
                for port in get_list(network, key):
                    if isinstance(port, dict):
                        port.setdefault("Value", 0)
                        port.setdefault("To", 0)
                        port.setdefault("HostNetwork", "default")
            networks.append(network)
    group["Networks"] = networks or None
    for service in get_list(group, "Services"):
        if isinstance(service, dict):
            service["Provider"] = service.get("Provider") or "consul"
    for task in get_list(group, "Tasks"):
        if isinstance(task, dict):
            _canonicalize_task(task)


def _canonicalize_task(task: Json) -> None:
    task.setdefault("Config", None)
    task.setdefault("Env", None)
    task.setdefault("User", "")
    task.setdefault("Leader", False)
    task.setdefault("KillSignal", "")
    if task.get("KillTimeout") is None:
        task["KillTimeout"] = 5 * S
    task["LogConfig"] = _merge(
        {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False}, task.get("LogConfig")
    )
    task["Resources"] = _merge(
        {"CPU": 100, "Cores": 0, "MemoryMB": 300, "MemoryMaxMB": 0, "DiskMB": 0},
        task.get("Resources"),
    )
    templates = []
    for template in get_list(task, "Templates"):
        if isinstance(template, dict):
            defaults: Json = {
                "SourcePath": "",
                "DestPath": "",
                "EmbeddedTmpl": "",
                "ChangeMode": "restart",
                "ChangeSignal": "",
                "Splay": 5 * S,
                "Perms": "0644",
                "LeftDelim": "{{",
                "RightDelim": "}}",
                "Envvars": False,
                "ErrMissingKey": False,
            }
            templates.append(_merge(defaults, template))
    task["Templates"] = templates or None
    for service in get_list(task, "Services"):
        if isinstance(service, dict):
            service["Provider"] = service.get("Provider") or "consul"


def validate(job: Json) -> list[str]:
    """The messages of structs.Job.Validate for the parts the double understands."""
    errors: list[str] = []
    job_id = str(job.get("ID") or "")
    if " " in job_id:
        errors.append("Job ID contains a space")
    if "\x00" in job_id:
        errors.append("Job ID contains a null character")
    if not job.get("Name"):
        errors.append("Missing job name")
    if job.get("Type") not in JOB_TYPES:
        errors.append(f"Invalid job type: {json.dumps(job.get('Type'))}")
    if not 1 <= as_int(job.get("Priority")) <= 100:
        errors.append("Job priority must be between [1, 100]")
    datacenters = job.get("Datacenters")
    if not isinstance(datacenters, list) or not datacenters:
        errors.append("Missing job datacenters")
    groups = [g for g in get_list(job, "TaskGroups") if isinstance(g, dict)]
    if not groups:
        errors.append("Missing job task groups")
    seen: dict[str, int] = {}
    for idx, group in enumerate(groups):
        name = str(group.get("Name") or "")
        if not name:
            errors.append(f"Job task group {idx + 1} missing name")
        elif name in seen:
            errors.append(
                f"Job task group {idx + 1} redefines '{name}' from group {seen[name] + 1}"
            )
        else:
            seen[name] = idx
    for group in groups:
        group_errors = _validate_group(group, str(job.get("Type")))
        if group_errors:
            errors.append(
                f"Task group {group.get('Name')} validation failed: {multierror(group_errors)}"
            )
    return errors


def _validate_group(group: Json, job_type: str) -> list[str]:
    errors: list[str] = []
    count = as_int(group.get("Count"))
    if count < 0:
        errors.append("Task group count can't be negative")
    tasks = [t for t in get_list(group, "Tasks") if isinstance(t, dict)]
    if not tasks:
        errors.append("Missing tasks for task group")
    restart_errors = _validate_restart(get_dict(group, "RestartPolicy"))
    if restart_errors:
        errors.append(multierror(restart_errors))
    if job_type not in ("system", "sysbatch"):
        reschedule_errors = _validate_reschedule(get_dict(group, "ReschedulePolicy"))
        if reschedule_errors:
            errors.append(multierror(reschedule_errors))
    scaling = group.get("Scaling")
    if isinstance(scaling, dict):
        errors.extend(_validate_scaling(scaling, count))
    seen: dict[str, int] = {}
    for idx, task in enumerate(tasks):
        name = str(task.get("Name") or "")
        if name and name in seen:
            errors.append(f"Task {idx + 1} redefines '{name}' from task {seen[name] + 1}")
        elif name:
            seen[name] = idx
        task_errors = _validate_task(task)
        if task_errors:
            label = name or str(idx + 1)
            errors.append(f"Task {label} validation failed: {multierror(task_errors)}")
    return errors


def _validate_restart(policy: Json) -> list[str]:
    """structs.RestartPolicy.Validate."""
    errors: list[str] = []
    mode = policy.get("Mode")
    attempts = as_int(policy.get("Attempts"))
    interval, delay = as_int(policy.get("Interval")), as_int(policy.get("Delay"))
    if mode not in ("delay", "fail"):
        errors.append(f"Unsupported restart mode: {json.dumps(mode)}")
    if attempts == 0 and mode != "fail":
        errors.append(f"Restart policy {json.dumps(mode)} with {attempts} attempts is ambiguous")
    if interval < RESTART_MIN_INTERVAL:
        errors.append(f"Interval can not be less than 5s (got {go_duration(interval)})")
    if attempts * delay > interval:
        errors.append(
            f"Nomad can't restart the TaskGroup {attempts} times in an interval of "
            f"{go_duration(interval)} with a delay of {go_duration(delay)}"
        )
    return errors


def _validate_reschedule(policy: Json) -> list[str]:
    """structs.ReschedulePolicy.Validate, without its cross-checks of delay progressions."""
    attempts = as_int(policy.get("Attempts"))
    unlimited = bool(policy.get("Unlimited"))
    if not (attempts > 0 or unlimited):
        return []
    errors: list[str] = []
    interval, delay = as_int(policy.get("Interval")), as_int(policy.get("Delay"))
    max_delay = as_int(policy.get("MaxDelay"))
    function = policy.get("DelayFunction")
    if attempts > 0:
        if interval <= 0:
            errors.append("Interval must be a non zero value if Attempts > 0")
        if unlimited:
            errors.append(
                f"Reschedule Policy with Attempts = {attempts}, "
                f"Interval = {go_duration(interval)}, and Unlimited = true is ambiguous"
            )
            errors.append("If Attempts >0, Unlimited cannot also be set to true")
    if delay < RESCHEDULE_MIN_DELAY:
        errors.append(f"Delay cannot be less than 5s (got {go_duration(delay)})")
    if function not in ("constant", "exponential", "fibonacci"):
        errors.append(
            f"Invalid delay function {json.dumps(function)}, must be one of "
            '["constant" "exponential" "fibonacci"]'
        )
    if function != "constant":
        if max_delay < RESCHEDULE_MIN_DELAY:
            errors.append(f"Max Delay cannot be less than 5s (got {go_duration(delay)})")
        if max_delay < delay:
            errors.append(
                f"Max Delay cannot be less than Delay {go_duration(delay)} "
                f"(got {go_duration(max_delay)})"
            )
    if not unlimited and interval < RESCHEDULE_MIN_INTERVAL:
        errors.append(f"Interval cannot be less than 15s (got {go_duration(interval)})")
    return errors


def _validate_scaling(scaling: Json, count: int) -> list[str]:
    errors: list[str] = []
    if scaling.get("Max") is None or as_int(scaling.get("Max"), -1) < 0:
        errors.append("Scaling policy invalid: maximum count must be specified and non-negative")
        return errors
    low, high = as_int(scaling.get("Min")), as_int(scaling.get("Max"))
    if high < low:
        errors.append("Scaling policy invalid: maximum count must not be less than minimum count")
    if high < count:
        errors.append(
            "Scaling policy invalid: task group count must not be greater than "
            "maximum count in scaling policy"
        )
    if count < low:
        errors.append(
            "Scaling policy invalid: task group count must not be less than "
            "minimum count in scaling policy"
        )
    return errors


def _validate_task(task: Json) -> list[str]:
    errors: list[str] = []
    name = str(task.get("Name") or "")
    if not name:
        errors.append("Missing task name")
    if "/" in name:
        errors.append("Task name cannot include slashes")
    if not task.get("Driver"):
        errors.append("Missing task driver")
    if as_int(task.get("KillTimeout")) < 0:
        errors.append("KillTimeout must be a positive value")
    return errors


def without_server_fields(job: Json) -> Json:
    return {k: v for k, v in job.items() if k not in SERVER_FIELDS}


def spec_changed(old: Json, new: Json) -> bool:
    return _canon(without_server_fields(old)) != _canon(without_server_fields(new))


def group_named(job: Json, name: str) -> Json | None:
    for group in get_list(job, "TaskGroups"):
        if isinstance(group, dict) and group.get("Name") == name:
            return group
    return None


def destructive_fingerprint(group: Json | None) -> str:
    """What forces new allocations when it changes (scheduler/util.go tasksUpdated)."""
    if group is None:
        return ""
    keys = ("Name", "Driver", "User", "Config", "Env", "Meta", "Templates", "Resources")
    tasks = [
        {key: task.get(key) for key in (*keys, "Artifacts", "Vault", "Lifecycle")}
        for task in get_list(group, "Tasks")
        if isinstance(task, dict)
    ]
    return _canon({"Networks": group.get("Networks"), "Meta": group.get("Meta"), "Tasks": tasks})


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
