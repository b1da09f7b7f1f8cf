"""Server-side scheduling: evaluations, placements, deployments, rescheduling.

A condensed version of Nomad's service/batch scheduler for one node
(https://developer.hashicorp.com/nomad/docs/concepts/scheduling/scheduling): every write
creates an evaluation which is processed at once. Placement fills the lowest free name
indexes and scale-down stops the highest (scheduler/reconcile.go); a group that cannot be
placed gets ``FailedTGAllocs`` metrics and a blocked evaluation; failed allocations are
rescheduled per the group's reschedule policy
(https://developer.hashicorp.com/nomad/docs/job-specification/reschedule); groups with an
``update`` strategy (``MaxParallel`` > 0) get a deployment for each new job version
(https://developer.hashicorp.com/nomad/docs/job-specification/update).

Every method expects the caller to hold ``state.lock``.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch

from .common import Json, as_int, deep_copy, get_dict, get_list, new_id, now_ns
from .jobspec import destructive_fingerprint, group_named
from .node import Client
from .state import Allocation, Deployment, Evaluation, State

NOT_NEEDED = "alloc not needed due to job update"
UPDATING = "alloc is being updated due to job update"
MIGRATING = "alloc is being migrated"
RESCHEDULED = "alloc was rescheduled because it failed"


class Scheduler:
    def __init__(self, state: State, client: Client, *, deployment_seconds: float) -> None:
        self.state = state
        self.client = client
        self.deployment_seconds = deployment_seconds
        client.listeners.append(self._on_alloc_status)

    # -- evaluations ----------------------------------------------------------------------------

    def new_eval(self, job: Json, trigger: str, *, index: int | None = None) -> Evaluation:
        index = index or self.state.next_index()
        ev = Evaluation(
            id=new_id(),
            namespace=str(job.get("Namespace")),
            priority=as_int(job.get("Priority"), 50),
            type=str(job.get("Type")),
            triggered_by=trigger,
            job_id=str(job.get("ID")),
            job_modify_index=as_int(job.get("JobModifyIndex")),
            status="pending",
            create_index=index,
            create_time=now_ns(),
            modify_index=index,
            modify_time=now_ns(),
        )
        self.state.evals[ev.id] = ev
        return ev

    def process(
        self, ev: Evaluation, job: Json, hints: dict[str, Allocation] | None = None
    ) -> None:
        """Run the scheduler for ``ev``: reconcile the job's allocations with its spec."""
        failures, queued = self._reconcile(job, ev, dict(hints or {}))
        ev.status = "complete"
        ev.queued_allocations = queued
        ev.failed_tg_allocs = failures or None
        self._cancel_blocked(job, keep=None)
        if failures:
            blocked = self.new_eval(job, ev.triggered_by)
            blocked.status = "blocked"
            blocked.status_description = "created to place remaining allocations"
            blocked.previous_eval = ev.id
            blocked.exhausted_dimension = any(
                m.get("DimensionExhausted") for m in failures.values()
            )
            ev.blocked_eval = blocked.id
        ev.modify_index = self.state.next_index()
        ev.modify_time = now_ns()
        self.refresh_status(ev.namespace, ev.job_id)

    def _cancel_blocked(self, job: Json, keep: str | None) -> None:
        for ev in self.state.evals.values():
            if (
                ev.status == "blocked"
                and ev.id != keep
                and ev.job_id == job.get("ID")
                and ev.namespace == job.get("Namespace")
            ):
                ev.status = "canceled"
                ev.status_description = "evaluation superseded by a newer evaluation"
                ev.modify_index = self.state.next_index()
                ev.modify_time = now_ns()

    def unblock(self, wanted: Callable[[Evaluation], bool]) -> None:
        """Re-run blocked evaluations after the node changed (drivers, freed capacity)."""
        for ev in [e for e in self.state.evals.values() if e.status == "blocked" and wanted(e)]:
            job = self.state.jobs.get((ev.namespace, ev.job_id))
            if job is None or ev.status != "blocked":
                continue
            ev.status = "pending"
            self.process(ev, job)

    # -- reconciliation -------------------------------------------------------------------------

    def _reconcile(
        self, job: Json, ev: Evaluation, hints: dict[str, Allocation]
    ) -> tuple[dict[str, Json], dict[str, int]]:
        namespace, job_id = str(job.get("Namespace")), str(job.get("ID"))
        live = [
            a
            for a in self.state.job_allocs(namespace, job_id, as_int(job.get("CreateIndex")))
            if a.desired_status == "run"
        ]
        groups = {str(g.get("Name")): g for g in get_list(job, "TaskGroups")}
        for alloc in live:
            if alloc.task_group not in groups:
                self.stop_alloc_record(alloc, NOT_NEEDED)
        failures: dict[str, Json] = {}
        queued: dict[str, int] = {}
        for name, group in groups.items():
            desired = 0 if job.get("Stop") else as_int(group.get("Count"))
            fingerprint = destructive_fingerprint(group)
            keep: list[Allocation] = []
            for alloc in (a for a in live if a.task_group == name):
                if destructive_fingerprint(group_named(alloc.job, name)) != fingerprint:
                    self.stop_alloc_record(alloc, UPDATING)
                    hints.setdefault(alloc.name, alloc)
                    continue
                if alloc.job.get("Version") != job.get("Version"):
                    alloc.job = deep_copy(job)  # an in-place update
                    self.state.touch_alloc(alloc)
                keep.append(alloc)
            keep.sort(key=lambda a: a.index)
            while len(keep) > desired:
                self.stop_alloc_record(keep.pop(), NOT_NEEDED)
            used = {a.index for a in keep}
            index, placed, failed = 0, 0, 0
            metric: Json = {}
            while placed + failed < desired - len(keep):
                while index in used:
                    index += 1
                used.add(index)
                ok, metric = self.feasible(job, group)
                if ok:
                    self._place(job, group, index, ev, metric, hints.get(_name(job, name, index)))
                    placed += 1
                else:
                    failed += 1
            queued[name] = failed
            if failed:
                metric["CoalescedFailures"] = failed - 1
                failures[name] = metric
        return failures, queued

    def feasible(self, job: Json, group: Json) -> tuple[bool, Json]:
        """Feasibility and bin-packing on the one node, with Nomad's AllocMetric shape."""
        node = self.state.node
        metric: Json = {
            "NodesEvaluated": 1,
            "NodesFiltered": 0,
            "NodesInPool": 1,
            "NodesAvailable": {node.datacenter: 1},
            "ClassFiltered": None,
            "ConstraintFiltered": None,
            "NodesExhausted": 0,
            "ClassExhausted": None,
            "DimensionExhausted": None,
            "QuotaExhausted": None,
            "ResourcesExhausted": None,
            "Scores": None,
            "ScoreMetaData": None,
            "AllocationTime": 1000,
            "CoalescedFailures": 0,
        }
        datacenters = [str(dc) for dc in get_list(job, "Datacenters")]
        if not any(fnmatch(node.datacenter, dc) for dc in datacenters):
            metric.update(NodesEvaluated=0, NodesAvailable={}, NodesInPool=0)
            return False, metric
        tasks = [t for t in get_list(group, "Tasks") if isinstance(t, dict)]
        if any(str(t.get("Driver")) not in node.drivers for t in tasks):
            metric.update(NodesFiltered=1, ConstraintFiltered={"missing drivers": 1})
            return False, metric
        cpu, memory, disk = _needs(group)
        used = [a for a in self.state.allocs.values() if not a.terminal]
        free = {
            "cpu": node.cpu_mhz - sum(a.cpu for a in used),
            "memory": node.memory_mb - sum(a.memory_mb for a in used),
            "disk": node.disk_mb - sum(a.disk_mb for a in used),
        }
        for dimension, need in (("cpu", cpu), ("memory", memory), ("disk", disk)):
            if need > free[dimension]:
                metric.update(NodesExhausted=1, DimensionExhausted={dimension: 1})
                return False, metric
        metric["Scores"] = {f"{node.id}.binpack": 0.5}
        return True, metric

    def _place(
        self,
        job: Json,
        group: Json,
        index: int,
        ev: Evaluation,
        metric: Json,
        previous: Allocation | None,
    ) -> Allocation:
        raft_index = self.state.next_index()
        cpu, memory, disk = _needs(group)
        group_name = str(group.get("Name"))
        alloc = Allocation(
            id=new_id(),
            namespace=str(job.get("Namespace")),
            eval_id=ev.id,
            name=_name(job, group_name, index),
            index=index,
            job_id=str(job.get("ID")),
            task_group=group_name,
            job=deep_copy(job),
            node_id=self.state.node.id,
            node_name=self.state.node.name,
            ports=self.client.allocate_ports(group),
            cpu=cpu,
            memory_mb=memory,
            disk_mb=disk,
            create_index=raft_index,
            create_time=now_ns(),
            modify_index=raft_index,
            modify_time=now_ns(),
            alloc_modify_index=raft_index,
            metrics=deep_copy(metric),
        )
        if previous is not None:
            alloc.previous_allocation = previous.id
            previous.next_allocation = alloc.id
            self.state.touch_alloc(previous)
        self.state.allocs[alloc.id] = alloc
        self.client.run(alloc)
        return alloc

    def stop_alloc_record(self, alloc: Allocation, description: str) -> None:
        alloc.desired_status = "stop"
        alloc.desired_description = description
        self.state.touch_alloc(alloc)
        self.client.stop(alloc.id, description)

    # -- deployments ----------------------------------------------------------------------------

    def start_deployment(self, job: Json) -> None:
        """Create a deployment for the job's current version when a group has an update block."""
        groups = {
            str(g.get("Name")): g
            for g in get_list(job, "TaskGroups")
            if as_int(get_dict(g, "Update").get("MaxParallel")) > 0 and as_int(g.get("Count")) > 0
        }
        self.cancel_deployments(job, "Cancelled due to newer version of job")
        if job.get("Stop") or not groups:
            return
        index = self.state.next_index()
        deployment = Deployment(
            id=new_id(),
            namespace=str(job.get("Namespace")),
            job_id=str(job.get("ID")),
            job_version=as_int(job.get("Version")),
            job_modify_index=as_int(job.get("JobModifyIndex")),
            job_create_index=as_int(job.get("CreateIndex")),
            status="running",
            status_description="Deployment is running",
            task_groups={
                name: _deployment_group(group, len(self._deployed(job, name)))
                for name, group in groups.items()
            },
            create_index=index,
            create_time=now_ns(),
            modify_index=index,
            modify_time=now_ns(),
        )
        self.state.deployments[deployment.id] = deployment
        for name in groups:
            for alloc in self._deployed(job, name):
                alloc.deployment_id = deployment.id
                alloc.deployment_healthy = None
                self.state.touch_alloc(alloc)
        self.state.after(self.deployment_seconds, lambda: self._finish_deployment(deployment.id))

    def _deployed(self, job: Json, group: str) -> list[Allocation]:
        allocs = self.state.job_allocs(
            str(job.get("Namespace")), str(job.get("ID")), as_int(job.get("CreateIndex"))
        )
        return [a for a in allocs if a.task_group == group and a.desired_status == "run"]

    def _finish_deployment(self, deployment_id: str) -> None:
        deployment = self.state.deployments.get(deployment_id)
        if deployment is None or not deployment.active:
            return
        healthy_everywhere = True
        for name, tg in deployment.task_groups.items():
            allocs = [
                a
                for a in self.state.allocs.values()
                if a.deployment_id == deployment_id and a.task_group == name
            ]
            for alloc in allocs:
                alloc.deployment_healthy = alloc.client_status == "running" and not alloc.terminal
                alloc.deployment_timestamp = now_ns()
                self.state.touch_alloc(alloc)
            healthy = sum(1 for a in allocs if a.deployment_healthy)
            tg.update(
                PlacedAllocs=len(allocs),
                HealthyAllocs=healthy,
                UnhealthyAllocs=len(allocs) - healthy,
            )
            healthy_everywhere &= healthy >= as_int(tg.get("DesiredTotal"))
        if healthy_everywhere:
            deployment.status = "successful"
            deployment.status_description = "Deployment completed successfully"
        else:
            deployment.status = "failed"
            deployment.status_description = "Failed due to unhealthy allocations"
        deployment.modify_index = self.state.next_index()
        deployment.modify_time = now_ns()

    def cancel_deployments(self, job: Json, description: str) -> None:
        for deployment in self.state.deployments.values():
            if (
                deployment.active
                and deployment.job_id == job.get("ID")
                and deployment.namespace == job.get("Namespace")
            ):
                deployment.status = "cancelled"
                deployment.status_description = description
                deployment.modify_index = self.state.next_index()
                deployment.modify_time = now_ns()

    def active_deployment(self, job: Json) -> Deployment | None:
        for deployment in self.state.deployments.values():
            if (
                deployment.active
                and deployment.job_id == job.get("ID")
                and deployment.namespace == job.get("Namespace")
                and deployment.job_create_index == job.get("CreateIndex")
            ):
                return deployment
        return None

    # -- client updates and rescheduling --------------------------------------------------------

    def _on_alloc_status(self, alloc: Allocation, previous: str) -> None:
        if self.state.closing:
            return
        if alloc.client_terminal:
            if alloc.client_status == "failed":
                self._maybe_reschedule(alloc)
            self.unblock(lambda ev: ev.exhausted_dimension)
        self.refresh_status(alloc.namespace, alloc.job_id)

    def _maybe_reschedule(self, alloc: Allocation) -> None:
        job = self.state.jobs.get((alloc.namespace, alloc.job_id))
        if (
            job is None
            or job.get("Stop")
            or alloc.desired_status != "run"
            or job.get("CreateIndex") != alloc.job.get("CreateIndex")
        ):
            return
        group = group_named(job, alloc.task_group)
        policy = get_dict(group or {}, "ReschedulePolicy")
        if not group or not _reschedule_eligible(alloc, policy):
            return
        delay_ns = _next_delay(alloc, policy)
        ev = self.new_eval(job, "alloc-failure")
        ev.wait_until = now_ns() + delay_ns
        alloc.followup_eval_id = ev.id
        self.state.touch_alloc(alloc)
        self.state.after(delay_ns / 1e9, lambda: self._reschedule(alloc.id, ev.id, delay_ns))

    def _reschedule(self, alloc_id: str, eval_id: str, delay_ns: int) -> None:
        alloc = self.state.allocs.get(alloc_id)
        ev = self.state.evals.get(eval_id)
        if alloc is None or ev is None:
            return
        job = self.state.jobs.get((alloc.namespace, alloc.job_id))
        if job is None or alloc.desired_status != "run" or job.get("Stop"):
            ev.status = "complete"
            ev.modify_index = self.state.next_index()
            return
        self.stop_alloc_record(alloc, RESCHEDULED)
        before = set(self.state.allocs)
        self.process(ev, job, {alloc.name: alloc})
        for new_alloc_id in set(self.state.allocs) - before:
            replacement = self.state.allocs[new_alloc_id]
            if replacement.previous_allocation == alloc.id:
                replacement.reschedule_events = [
                    *alloc.reschedule_events,
                    {
                        "RescheduleTime": now_ns(),
                        "PrevAllocID": alloc.id,
                        "PrevNodeID": alloc.node_id,
                        "Delay": delay_ns,
                    },
                ]

    # -- job status -----------------------------------------------------------------------------

    def refresh_status(self, namespace: str, job_id: str) -> None:
        """structs getJobStatus: running, pending or dead from allocations and evaluations."""
        job = self.state.jobs.get((namespace, job_id))
        if job is None:
            return
        allocs = self.state.job_allocs(namespace, job_id, as_int(job.get("CreateIndex")))
        evals = [
            e for e in self.state.evals.values() if e.namespace == namespace and e.job_id == job_id
        ]
        if any(not a.terminal for a in allocs):
            status = "running"
        elif any(e.status in ("pending", "blocked") for e in evals):
            status = "pending"
        elif allocs or evals:
            status = "dead"
        else:
            status = "pending"
        if job.get("Status") != status:
            job["Status"] = status
            job["ModifyIndex"] = self.state.next_index()


def _name(job: Json, group: str, index: int) -> str:
    return f"{job.get('ID')}.{group}[{index}]"


def _needs(group: Json) -> tuple[int, int, int]:
    tasks = [t for t in get_list(group, "Tasks") if isinstance(t, dict)]
    cpu = sum(as_int(get_dict(t, "Resources").get("CPU")) for t in tasks)
    memory = sum(as_int(get_dict(t, "Resources").get("MemoryMB")) for t in tasks)
    disk = as_int(get_dict(group, "EphemeralDisk").get("SizeMB"))
    return cpu, memory, disk


def _deployment_group(group: Json, placed: int) -> Json:
    update = get_dict(group, "Update")
    return {
        "AutoRevert": bool(update.get("AutoRevert")),
        "AutoPromote": bool(update.get("AutoPromote")),
        "ProgressDeadline": as_int(update.get("ProgressDeadline")),
        "RequireProgressBy": None,
        "Promoted": False,
        "PlacedCanaries": None,
        "DesiredCanaries": as_int(update.get("Canary")),
        "DesiredTotal": as_int(group.get("Count")),
        "PlacedAllocs": placed,
        "HealthyAllocs": 0,
        "UnhealthyAllocs": 0,
    }


def _reschedule_eligible(alloc: Allocation, policy: Json) -> bool:
    """structs.Allocation.RescheduleEligible."""
    attempts = as_int(policy.get("Attempts"))
    unlimited = bool(policy.get("Unlimited"))
    if not (attempts > 0 or unlimited):
        return False
    if unlimited:
        return True
    interval = as_int(policy.get("Interval"))
    now = now_ns()
    recent = [
        e
        for e in alloc.reschedule_events
        if interval <= 0 or now - as_int(e.get("RescheduleTime")) < interval
    ]
    return len(recent) < attempts


def _next_delay(alloc: Allocation, policy: Json) -> int:
    """structs.Allocation.NextDelay (constant, exponential or fibonacci, capped by MaxDelay)."""
    delay = as_int(policy.get("Delay"))
    history = [as_int(e.get("Delay")) for e in alloc.reschedule_events]
    if not history:
        return delay
    function = policy.get("DelayFunction")
    if function == "exponential":
        delay = history[-1] * 2
    elif function == "fibonacci" and len(history) >= 2:
        delay = history[-1] + history[-2]
    elif function == "fibonacci":
        delay = history[-1]
    max_delay = as_int(policy.get("MaxDelay"))
    if max_delay > 0:
        delay = min(delay, max_delay)
    return delay
