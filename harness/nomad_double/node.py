"""The double's single client node: it runs placed allocations with their task runners.

Client-side behaviour follows Nomad's client: alloc directories
(https://developer.hashicorp.com/nomad/docs/runtime/environment#task-directories), the
runtime environment (client/taskenv/env.go: host env minus the default denylist, then
NOMAD_* values, then the task's Env, then template env), the alloc ClientStatus derived from
task states, and killing sibling tasks when one fails.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from . import events
from .common import Json, get_dict, get_list
from .jobspec import group_named
from .state import Allocation, Port, State, TaskState
from .tasks import TaskDirs, TaskHooks, TaskRunner
from .templates import Lookup

HOST_IP = "127.0.0.1"
MAX_EVENTS = 10

# Nomad client's default env.denylist: never passed from the host into tasks.
ENV_DENYLIST = {
    "CONSUL_TOKEN",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_LICENSE",
    "VAULT_TOKEN",
    "VAULT_LICENSE",
    "NOMAD_LICENSE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
}

# Called under the state lock when an allocation's ClientStatus changes.
StatusListener = Callable[[Allocation, str], None]


def client_status(task_states: Mapping[str, TaskState]) -> tuple[str, str]:
    """client/allocrunner getClientStatus."""
    states = list(task_states.values())
    if any(ts.state == "dead" and ts.failed for ts in states):
        return "failed", "Failed tasks"
    if any(ts.state == "running" for ts in states):
        return "running", "Tasks are running"
    if any(ts.state == "pending" for ts in states):
        return "pending", "No tasks have started"
    return "complete", "All tasks have completed"


def clean_env_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


class Client(TaskHooks):
    def __init__(self, state: State, root: Path, host_env: Mapping[str, str]) -> None:
        self.state = state
        self.root = root
        self.host_env = {k: v for k, v in host_env.items() if k not in ENV_DENYLIST}
        self.runners: dict[str, dict[str, TaskRunner]] = {}
        self.listeners: list[StatusListener] = []
        self._ports_in_use: set[int] = set()

    # -- placement support -------------------------------------------------------------------

    def allocate_ports(self, group: Json) -> list[Port]:
        ports: list[Port] = []
        for network in get_list(group, "Networks"):
            if not isinstance(network, dict):
                continue
            for port in get_list(network, "ReservedPorts"):
                ports.append(Port(str(port.get("Label")), int(port.get("Value") or 0), _to(port)))
            for port in get_list(network, "DynamicPorts"):
                ports.append(Port(str(port.get("Label")), self._free_port(), _to(port)))
        self._ports_in_use.update(p.value for p in ports)
        return ports

    def _free_port(self) -> int:
        while True:
            with socket.socket() as probe:
                probe.bind((HOST_IP, 0))
                port: int = probe.getsockname()[1]
            if port not in self._ports_in_use:
                return port

    # -- running allocations (called under the state lock) -----------------------------------

    def run(self, alloc: Allocation) -> None:
        group = group_named(alloc.job, alloc.task_group) or {}
        alloc.alloc_root = self.root / alloc.id
        runners: dict[str, TaskRunner] = {}
        for task in get_list(group, "Tasks"):
            if not isinstance(task, dict):
                continue
            name = str(task.get("Name"))
            alloc.task_states[name] = TaskState(events=[events.received()])
            dirs = TaskDirs(alloc.alloc_root / "alloc", alloc.alloc_root / name)
            dirs.create()
            runners[name] = TaskRunner(
                hooks=self,
                alloc_id=alloc.id,
                job=alloc.job,
                group=group,
                task=task,
                dirs=dirs,
                env=self._env(alloc, task, dirs),
            )
        self.runners[alloc.id] = runners
        if self.state.closing:
            return
        for runner in runners.values():
            runner.start()

    def stop(self, alloc_id: str, reason: str = "") -> None:
        for runner in self.runners.get(alloc_id, {}).values():
            runner.stop(reason)

    def crash(self, alloc_id: str) -> int:
        return sum(runner.crash() for runner in self.runners.get(alloc_id, {}).values())

    def pids(self, alloc_id: str) -> dict[str, int | None]:
        return {name: r.pid for name, r in self.runners.get(alloc_id, {}).items()}

    def on_variable_changed(self, namespace: str, path: str) -> None:
        for runners in list(self.runners.values()):
            for runner in runners.values():
                if (namespace, path) in runner.used_vars and runner.thread.is_alive():
                    runner.rerender()

    def close(self) -> None:
        all_runners = [r for runners in self.runners.values() for r in runners.values()]
        for runner in all_runners:
            runner.kill_now()
        for runner in all_runners:
            if runner.thread.is_alive():
                runner.thread.join(timeout=15)

    # -- TaskHooks ----------------------------------------------------------------------------

    def update(
        self, alloc_id: str, task: str, change: Callable[[TaskState], None], event: Json | None
    ) -> None:
        with self.state.lock:
            alloc = self.state.allocs.get(alloc_id)
            if alloc is None:
                return
            task_state = alloc.task_states.setdefault(task, TaskState())
            was_failed = task_state.failed
            change(task_state)
            if event is not None:
                task_state.events.append(event)
                del task_state.events[:-MAX_EVENTS]
            previous = alloc.client_status
            alloc.client_status, alloc.client_description = client_status(alloc.task_states)
            self.state.touch_alloc(alloc)
            if task_state.failed and not was_failed:
                self._kill_siblings(alloc, task)
            if alloc.client_status != previous:
                if alloc.client_terminal:
                    self._ports_in_use.difference_update(p.value for p in alloc.ports)
                for listener in self.listeners:
                    listener(alloc, previous)

    def _kill_siblings(self, alloc: Allocation, failed_task: str) -> None:
        for name, runner in self.runners.get(alloc.id, {}).items():
            if name != failed_task and alloc.task_states[name].state != "dead":
                runner.stop(
                    f"Task's sibling {failed_task!r} failed", events.sibling_failed(failed_task)
                )

    def lookup_variable(self, job: Json, group: str, task: str) -> Lookup:
        job_id = str(job.get("ID"))
        job_ns = str(job.get("Namespace") or "default")

        def lookup(namespace: str, path: str) -> Mapping[str, str] | None:
            # The implicit workload-identity policy: nomad/jobs and the job's own paths.
            allowed = namespace == job_ns and (
                path in ("nomad/jobs", f"nomad/jobs/{job_id}")
                or path.startswith(f"nomad/jobs/{job_id}/")
            )
            if not allowed:
                return None
            with self.state.lock:
                variable = self.state.variables.get((namespace, path))
                return dict(variable.items) if variable is not None else None

        return lookup

    def driver_usable(self, driver: str) -> str:
        if driver not in self.state.node.drivers:
            return f"driver {driver!r} is not available on this node"
        if driver != "raw_exec":
            return (
                f"failed to start task: the {driver} driver is enabled on the Nomad test double "
                "but only raw_exec tasks can run here"
            )
        return ""

    # -- environment --------------------------------------------------------------------------

    def _env(self, alloc: Allocation, task: Json, dirs: TaskDirs) -> dict[str, str]:
        job = alloc.job
        resources = get_dict(task, "Resources")
        env = {
            "NOMAD_ALLOC_DIR": str(dirs.alloc_dir),
            "NOMAD_TASK_DIR": str(dirs.local_dir),
            "NOMAD_SECRETS_DIR": str(dirs.secrets_dir),
            "NOMAD_MEMORY_LIMIT": str(resources.get("MemoryMB") or 0),
            "NOMAD_CPU_LIMIT": str(resources.get("CPU") or 0),
            "NOMAD_ALLOC_ID": alloc.id,
            "NOMAD_SHORT_ALLOC_ID": alloc.id[:8],
            "NOMAD_ALLOC_NAME": alloc.name,
            "NOMAD_GROUP_NAME": alloc.task_group,
            "NOMAD_ALLOC_INDEX": str(alloc.index),
            "NOMAD_TASK_NAME": str(task.get("Name")),
            "NOMAD_JOB_ID": str(job.get("ID")),
            "NOMAD_JOB_NAME": str(job.get("Name")),
            "NOMAD_DC": self.state.node.datacenter,
            "NOMAD_NAMESPACE": alloc.namespace,
            "NOMAD_REGION": str(job.get("Region") or self.state.region),
        }
        if job.get("ParentID"):
            env["NOMAD_JOB_PARENT_ID"] = str(job.get("ParentID"))
        meta: dict[str, str] = {}
        group = group_named(job, alloc.task_group) or {}
        for source in (job.get("Meta"), group.get("Meta"), task.get("Meta")):
            if isinstance(source, dict):
                meta.update({str(k): str(v) for k, v in source.items()})
        for key, value in meta.items():
            env[clean_env_key(f"NOMAD_META_{key}")] = value
            env[clean_env_key(f"NOMAD_META_{key.upper()}")] = value
        for port in alloc.ports:
            label = clean_env_key(port.label)
            addr = f"{HOST_IP}:{port.value}"
            inner = str(port.to if port.to > 0 else port.value)
            env[f"NOMAD_ADDR_{label}"] = addr
            env[f"NOMAD_HOST_ADDR_{label}"] = addr
            env[f"NOMAD_IP_{label}"] = HOST_IP
            env[f"NOMAD_HOST_IP_{label}"] = HOST_IP
            env[f"NOMAD_PORT_{label}"] = inner
            env[f"NOMAD_ALLOC_PORT_{label}"] = inner
            env[f"NOMAD_HOST_PORT_{label}"] = str(port.value)
        for key, value in self.host_env.items():
            env.setdefault(key, value)
        return env


def _to(port: Json) -> int:
    value = port.get("To")
    return int(value) if isinstance(value, int) and value > 0 else 0
