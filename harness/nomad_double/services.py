"""Nomad-native service discovery (``Provider: "nomad"``) and its health checks."""

from __future__ import annotations

import hashlib
import http.client
import socket
from typing import Any

from .common import Json, NomadError, as_int, get_list, now_ns
from .node import HOST_IP
from .server import Request, Route, route
from .state import Allocation, State


class ServicesAPI:
    def __init__(self, state: State) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            route("GET", "/v1/services", self.list_services),
            route("GET", "/v1/service/(?P<name>[^/]+)", self.read),
            route("GET", "/v1/job/(?P<job_id>.+?)/services", self.job_services),
            route("GET", "/v1/allocation/(?P<alloc_id>[^/]+)/services", self.alloc_services),
            route("GET", "/v1/allocation/(?P<alloc_id>[^/]+)/checks", self.checks),
            route("GET", "/v1/client/allocation/(?P<alloc_id>[^/]+)/checks", self.checks),
        ]

    def registrations(self) -> list[Json]:
        """Registrations of running allocations (the client registers on task start)."""
        out: list[Json] = []
        for alloc in sorted(self.state.allocs.values(), key=lambda a: a.create_index):
            if alloc.desired_status != "run" or alloc.client_status != "running":
                continue
            for service, task in _services(alloc):
                out.append(_registration(self.state, alloc, service, task))
        return out

    # https://developer.hashicorp.com/nomad/api-docs/services#list-services
    def list_services(self, request: Request) -> Any:
        with self.state.lock:
            by_namespace: dict[str, dict[str, set[str]]] = {}
            for reg in self.registrations():
                if request.namespace not in ("*", reg["Namespace"]):
                    continue
                tags = by_namespace.setdefault(reg["Namespace"], {}).setdefault(
                    reg["ServiceName"], set()
                )
                tags.update(reg["Tags"] or [])
            return [
                {
                    "Namespace": namespace,
                    "Services": [
                        {"ServiceName": name, "Tags": sorted(tags)}
                        for name, tags in sorted(services.items())
                    ],
                }
                for namespace, services in sorted(by_namespace.items())
            ]

    # https://developer.hashicorp.com/nomad/api-docs/services#read-service
    def read(self, request: Request) -> Any:
        with self.state.lock:
            return [
                reg
                for reg in self.registrations()
                if reg["ServiceName"] == request.params["name"]
                and request.namespace in ("*", reg["Namespace"])
            ]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#job-services
    def job_services(self, request: Request) -> Any:
        with self.state.lock:
            return [
                reg
                for reg in self.registrations()
                if reg["JobID"] == request.params["job_id"]
                and reg["Namespace"] == request.namespace
            ]

    # https://developer.hashicorp.com/nomad/api-docs/allocations#allocation-services
    def alloc_services(self, request: Request) -> Any:
        with self.state.lock:
            if request.params["alloc_id"] not in self.state.allocs:
                raise NomadError(404, "allocation not found")
            return [r for r in self.registrations() if r["AllocID"] == request.params["alloc_id"]]

    # https://developer.hashicorp.com/nomad/api-docs/allocations#allocation-checks
    def checks(self, request: Request) -> Any:
        with self.state.lock:
            alloc = self.state.allocs.get(request.params["alloc_id"])
            if alloc is None:
                raise NomadError(404, "Unknown allocation")
            targets = [
                (
                    service,
                    task,
                    check,
                    _port(alloc, str(check.get("PortLabel") or service.get("PortLabel") or "")),
                )
                for service, task in _services(alloc)
                for check in get_list(service, "Checks")
                if isinstance(check, dict)
            ]
            running = alloc.client_status == "running"
        results: Json = {}
        for service, task, check, port in targets:
            check_id = hashlib.sha1(
                f"{alloc.id}/{service.get('Name')}/{check.get('Name')}".encode()
            ).hexdigest()[:32]
            status, code, output = _run_check(check, port) if running else ("pending", 0, "")
            results[check_id] = {
                "ID": check_id,
                "Check": check.get("Name") or f"service: {service.get('Name')!r} check",
                "Group": f"{alloc.job_id}.{alloc.task_group}[{alloc.index}]",
                "Mode": "readiness" if check.get("OnUpdate") == "ignore" else "healthiness",
                "Output": output,
                "Service": service.get("Name"),
                "Task": task,
                "Status": status,
                "StatusCode": code,
                "Timestamp": now_ns() // 1_000_000_000,
            }
        return results


def _services(alloc: Allocation) -> list[tuple[Json, str]]:
    group: Json = {}
    for candidate in get_list(alloc.job, "TaskGroups"):
        if candidate.get("Name") == alloc.task_group:
            group = candidate
    found: list[tuple[Json, str]] = [
        (s, "") for s in get_list(group, "Services") if s.get("Provider") == "nomad"
    ]
    for task in get_list(group, "Tasks"):
        found.extend(
            (s, str(task.get("Name")))
            for s in get_list(task, "Services")
            if s.get("Provider") == "nomad"
        )
    return found


def _registration(state: State, alloc: Allocation, service: Json, task: str) -> Json:
    job_name = str(alloc.job.get("Name"))
    default = f"{job_name}-{alloc.task_group}" + (f"-{task}" if task else "")
    name = str(service.get("Name") or default)
    for key, value in (
        ("${NOMAD_JOB_NAME}", job_name),
        ("${JOB}", job_name),
        ("${NOMAD_GROUP_NAME}", alloc.task_group),
        ("${TASKGROUP}", alloc.task_group),
        ("${NOMAD_TASK_NAME}", task),
        ("${TASK}", task),
    ):
        name = name.replace(key, value)
    label = str(service.get("PortLabel") or "")
    owner = task or f"group-{alloc.task_group}"
    return {
        "ID": f"_nomad-task-{alloc.id}-{owner}-{name}-{label}",
        "ServiceName": name,
        "Namespace": alloc.namespace,
        "NodeID": alloc.node_id,
        "Datacenter": state.node.datacenter,
        "JobID": alloc.job_id,
        "AllocID": alloc.id,
        "Tags": list(service.get("Tags") or []),
        "Address": HOST_IP,
        "Port": _port(alloc, label),
        "CreateIndex": alloc.create_index,
        "ModifyIndex": alloc.modify_index,
    }


def _port(alloc: Allocation, label: str) -> int:
    for port in alloc.ports:
        if port.label == label:
            return port.value
    return as_int(label)


def _run_check(check: Json, port: int) -> tuple[str, int, str]:
    timeout = max(as_int(check.get("Timeout"), 2_000_000_000) / 1e9, 0.1)
    kind = str(check.get("Type") or "")
    try:
        if kind == "tcp":
            with socket.create_connection((HOST_IP, port), timeout=timeout):
                return "success", 0, "nomad: tcp ok"
        if kind == "http":
            conn = http.client.HTTPConnection(HOST_IP, port, timeout=timeout)
            try:
                conn.request(str(check.get("Method") or "GET"), str(check.get("Path") or "/"))
                code = conn.getresponse().status
            finally:
                conn.close()
            status = "success" if 200 <= code < 300 else "failure"
            return status, code, f"nomad: http {'ok' if status == 'success' else 'not ok'}"
    except OSError as err:
        return "failure", 0, f"nomad: {err}"
    return "pending", 0, f"nomad: check type {kind!r} is not run by the test double"
