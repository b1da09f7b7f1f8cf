"""Allocations: list, read, stop — and the JSON shapes of an allocation."""

from __future__ import annotations

from typing import Any

from .common import Json, NomadError, deep_copy, get_dict, get_list, now_ns, rfc3339
from .filter import compile_filter
from .node import HOST_IP
from .scheduler import MIGRATING, Scheduler
from .server import Reply, Request, Route, route
from .state import Allocation, State, TaskState

STUB_FIELDS = {
    "ID",
    "EvalID",
    "Name",
    "Namespace",
    "NodeID",
    "NodeName",
    "JobID",
    "JobType",
    "JobVersion",
    "TaskGroup",
    "AllocatedResources",
    "DesiredStatus",
    "DesiredDescription",
    "ClientStatus",
    "ClientDescription",
    "DesiredTransition",
    "TaskStates",
    "DeploymentStatus",
    "FollowupEvalID",
    "NextAllocation",
    "RescheduleTracker",
    "PreemptedAllocations",
    "PreemptedByAllocation",
    "CreateIndex",
    "ModifyIndex",
    "CreateTime",
    "ModifyTime",
}


def task_state_json(ts: TaskState) -> Json:
    return {
        "State": ts.state,
        "Failed": ts.failed,
        "Restarts": ts.restarts,
        "LastRestart": rfc3339(ts.last_restart),
        "StartedAt": rfc3339(ts.started_at),
        "FinishedAt": rfc3339(ts.finished_at),
        "Events": deep_copy(ts.events),
        "TaskHandle": None,
    }


def allocated_resources(alloc: Allocation) -> Json:
    """structs.AllocatedResources; Shared.Ports holds the reachable host ports."""
    group = _group(alloc)
    tasks: Json = {}
    for task in get_list(group, "Tasks"):
        resources = get_dict(task, "Resources")
        tasks[str(task.get("Name"))] = {
            "Cpu": {"CpuShares": resources.get("CPU", 0), "ReservedCores": None},
            "Memory": {
                "MemoryMB": resources.get("MemoryMB", 0),
                "MemoryMaxMB": resources.get("MemoryMaxMB", 0),
            },
            "Networks": None,
            "Devices": None,
        }
    networks = None
    ports = None
    if get_list(group, "Networks"):
        dynamic = [p for p in alloc.ports if _is_dynamic(group, p.label)]
        reserved = [p for p in alloc.ports if not _is_dynamic(group, p.label)]
        networks = [
            {
                "Mode": "host",
                "Device": "",
                "CIDR": "",
                "IP": HOST_IP,
                "Hostname": "",
                "MBits": 0,
                "DNS": None,
                "ReservedPorts": [_port(p) for p in reserved] or None,
                "DynamicPorts": [_port(p) for p in dynamic] or None,
            }
        ]
        ports = [
            {"Label": p.label, "Value": p.value, "To": p.to, "HostIP": HOST_IP} for p in alloc.ports
        ]
    return {
        "Tasks": tasks,
        "TaskLifecycles": {name: None for name in tasks},
        "Shared": {"DiskMB": alloc.disk_mb, "Networks": networks, "Ports": ports},
    }


def _port(p: Any) -> Json:
    return {"Label": p.label, "Value": p.value, "To": p.to, "HostNetwork": "default"}


def _is_dynamic(group: Json, label: str) -> bool:
    for network in get_list(group, "Networks"):
        for port in get_list(network, "DynamicPorts"):
            if port.get("Label") == label:
                return True
    return False


def _group(alloc: Allocation) -> Json:
    for group in get_list(alloc.job, "TaskGroups"):
        if group.get("Name") == alloc.task_group:
            return dict(group)
    return {}


def _deployment_status(alloc: Allocation) -> Json | None:
    if not alloc.deployment_id:
        return None
    return {
        "Healthy": alloc.deployment_healthy,
        "Timestamp": rfc3339(alloc.deployment_timestamp),
        "Canary": False,
        "ModifyIndex": alloc.modify_index,
    }


def _reschedule_tracker(alloc: Allocation) -> Json | None:
    if not alloc.reschedule_events:
        return None
    return {"Events": deep_copy(alloc.reschedule_events)}


def stub(alloc: Allocation, *, resources: bool = False, task_states: bool = True) -> Json:
    """structs.AllocListStub; AllocatedResources only when asked for (``resources=true``)."""
    out: Json = {
        "ID": alloc.id,
        "EvalID": alloc.eval_id,
        "Name": alloc.name,
        "Namespace": alloc.namespace,
        "NodeID": alloc.node_id,
        "NodeName": alloc.node_name,
        "JobID": alloc.job_id,
        "JobType": alloc.job.get("Type"),
        "JobVersion": alloc.job.get("Version"),
        "TaskGroup": alloc.task_group,
        "DesiredStatus": alloc.desired_status,
        "DesiredDescription": alloc.desired_description,
        "ClientStatus": alloc.client_status,
        "ClientDescription": alloc.client_description,
        "DesiredTransition": {
            "Migrate": True if alloc.desired_migrate else None,
            "Reschedule": None,
            "ForceReschedule": None,
            "NoShutdownDelay": None,
        },
        "TaskStates": {n: task_state_json(ts) for n, ts in alloc.task_states.items()}
        if task_states
        else None,
        "DeploymentStatus": _deployment_status(alloc),
        "FollowupEvalID": alloc.followup_eval_id,
        "NextAllocation": alloc.next_allocation,
        "RescheduleTracker": _reschedule_tracker(alloc),
        "PreemptedAllocations": None,
        "PreemptedByAllocation": "",
        "CreateIndex": alloc.create_index,
        "ModifyIndex": alloc.modify_index,
        "CreateTime": alloc.create_time,
        "ModifyTime": alloc.modify_time,
    }
    if resources:
        out["AllocatedResources"] = allocated_resources(alloc)
    return out


def full(alloc: Allocation) -> Json:
    """structs.Allocation as GET /v1/allocation/:id answers it."""
    out = stub(alloc, resources=True)
    for key in ("JobType", "JobVersion"):
        out.pop(key)
    out.update(
        {
            "Job": deep_copy(alloc.job),
            "Resources": None,
            "SharedResources": None,
            "TaskResources": None,
            "Metrics": deep_copy(alloc.metrics),
            "DeploymentID": alloc.deployment_id,
            "PreviousAllocation": alloc.previous_allocation,
            "AllocModifyIndex": alloc.alloc_modify_index,
            "AllocStates": None,
            "NetworkStatus": {"InterfaceName": "", "Address": "", "DNS": None},
            "SignedIdentities": None,
        }
    )
    return out


class AllocationsAPI:
    def __init__(self, state: State, scheduler: Scheduler) -> None:
        self.state = state
        self.scheduler = scheduler

    def routes(self) -> list[Route]:
        return [
            route("GET", "/v1/allocations", self.list_allocations),
            route("POST,PUT", "/v1/allocation/(?P<alloc_id>[^/]+)/stop", self.stop),
            route("GET", "/v1/allocation/(?P<alloc_id>[^/]+)", self.read),
        ]

    # https://developer.hashicorp.com/nomad/api-docs/allocations#list-allocations
    def list_allocations(self, request: Request) -> Any:
        resources = request.flag("resources")
        task_states = request.flag("task_states", True)
        namespace = request.namespace
        prefix = request.query.get("prefix", "")
        expression = request.query.get("filter", "")
        matches = compile_filter(expression, STUB_FIELDS) if expression else None
        with self.state.lock:
            allocs = sorted(self.state.allocs.values(), key=lambda a: (a.create_index, a.id))
            out = []
            for alloc in allocs:
                if namespace != "*" and alloc.namespace != namespace:
                    continue
                if prefix and not alloc.id.startswith(prefix):
                    continue
                item = stub(alloc, resources=resources, task_states=task_states)
                if matches is None or matches(item):
                    out.append(item)
            return out

    # https://developer.hashicorp.com/nomad/api-docs/allocations#read-allocation
    def read(self, request: Request) -> Any:
        with self.state.lock:
            alloc = self.state.allocs.get(request.params["alloc_id"])
            if alloc is None:
                raise NomadError(404, "alloc not found")
            return full(alloc)

    # https://developer.hashicorp.com/nomad/api-docs/allocations#stop-allocation
    def stop(self, request: Request) -> Any:
        with self.state.lock:
            alloc = self.state.allocs.get(request.params["alloc_id"])
            if alloc is None:
                raise NomadError(404, "allocation not found")
            job = self.state.jobs.get((alloc.namespace, alloc.job_id)) or alloc.job
            ev = self.scheduler.new_eval(job, "alloc-stop")
            alloc.desired_migrate = True
            was_running = alloc.desired_status == "run"
            self.scheduler.stop_alloc_record(alloc, MIGRATING)
            current = self.state.jobs.get((alloc.namespace, alloc.job_id))
            if current is not None and was_running:
                self.scheduler.process(ev, current, {alloc.name: alloc})
            else:
                ev.status = "complete"
                ev.modify_index = self.state.next_index()
                ev.modify_time = now_ns()
            return Reply({"EvalID": ev.id, "Index": ev.create_index}, index=ev.create_index)
