"""Job scaling: POST/GET /v1/job/:job_id/scale, with the checks of nomad/job_endpoint.go Scale."""

from __future__ import annotations

from typing import Any

from .common import Json, NomadError, as_int, deep_copy, get_dict, now_ns
from .jobspec import group_named
from .scheduler import Scheduler
from .server import Reply, Request, Route, route
from .state import State

ENFORCE = "Enforcing job modify index"


class ScalingAPI:
    def __init__(self, state: State, scheduler: Scheduler) -> None:
        self.state = state
        self.scheduler = scheduler

    def routes(self) -> list[Route]:
        pattern = "/v1/job/(?P<job_id>.+?)/scale"
        return [route("POST,PUT", pattern, self.scale), route("GET", pattern, self.status)]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#scale-task-group
    def scale(self, request: Request) -> Any:
        body = request.json()
        if not isinstance(body, dict):
            raise NomadError(400, "Request body is empty")
        target = get_dict(body, "Target")
        count = body.get("Count")
        namespace, job_id = request.namespace, request.params["job_id"]
        self._validate(body, target, count, namespace, job_id)
        group_name = str(target.get("Group"))
        with self.state.lock:
            job = self.state.jobs.get((namespace, job_id))
            if job is None:
                raise NomadError(404, f'job "{job_id}" not found')
            if job.get("Type") == "system" and count is not None and as_int(count) > 1:
                raise NomadError(400, 'jobs of type "system" can only be scaled to 1 or 0')
            group = group_named(job, group_name)
            if group is None:
                raise NomadError(
                    400, f'task group "{group_name}" specified for scaling does not exist in job'
                )
            previous = as_int(group.get("Count"))
            reply: Json = {"EvalID": "", "EvalCreateIndex": 0, "Warnings": ""}
            if count is not None:
                count = as_int(count)
                self._check_policy(group, count)
                if self.scheduler.active_deployment(job) is not None:
                    raise NomadError(400, "job scaling blocked due to active deployment")
                wanted = as_int(body.get("JobModifyIndex"))
                if wanted > 0 and wanted != as_int(job.get("JobModifyIndex")):
                    current = as_int(job.get("JobModifyIndex"))
                    raise NomadError(
                        500,
                        f"{ENFORCE} {wanted}: job exists with conflicting job modify index: "
                        f"{current}",
                    )
                index = self.state.next_index()
                group["Count"] = count
                job["Version"] = as_int(job.get("Version")) + 1
                job.update(ModifyIndex=index, JobModifyIndex=index, SubmitTime=now_ns())
                ev = self.scheduler.new_eval(job, "job-scaling")
                self.scheduler.process(ev, job)
                self.scheduler.start_deployment(job)
                reply.update(EvalID=ev.id, EvalCreateIndex=ev.create_index, JobModifyIndex=index)
            else:
                reply["JobModifyIndex"] = job.get("ModifyIndex")
            event_index = self.state.next_index()
            events = self.state.scale_events.setdefault((namespace, job_id), {})
            events.setdefault(group_name, []).insert(
                0,
                {
                    "Count": count,
                    "PreviousCount": previous,
                    "Message": body.get("Message", ""),
                    "Error": bool(body.get("Error")),
                    "Meta": deep_copy(body.get("Meta")),
                    "EvalID": reply["EvalID"] or None,
                    "Time": now_ns(),
                    "CreateIndex": event_index,
                },
            )
            reply.update(Index=event_index, LastContact=0, KnownLeader=False)
            return Reply(reply, index=event_index)

    @staticmethod
    def _validate(body: Json, target: Json, count: Any, namespace: str, job_id: str) -> None:
        """structs.JobScaleRequest.Validate."""
        if target.get("Namespace") and target.get("Namespace") != namespace:
            raise NomadError(400, "namespace in payload did not match header")
        if target.get("Job") and target.get("Job") != job_id:
            raise NomadError(500, "job ID in payload did not match URL")
        if not target.get("Group"):
            raise NomadError(400, "missing task group name for scaling action")
        if count is not None:
            if not isinstance(count, int) or isinstance(count, bool):
                raise NomadError(400, "json: cannot unmarshal Count into an int64")
            if count < 0:
                raise NomadError(400, "scaling action count can't be negative")
            if body.get("Error"):
                raise NomadError(400, "scaling action should not contain count if error is true")

    @staticmethod
    def _check_policy(group: Json, count: int) -> None:
        scaling = group.get("Scaling")
        if not isinstance(scaling, dict):
            return
        low, high = as_int(scaling.get("Min")), as_int(scaling.get("Max"))
        if count < low:
            raise NomadError(
                400, f"group count was less than scaling policy minimum: {count} < {low}"
            )
        if high < count:
            raise NomadError(
                400, f"group count was greater than scaling policy maximum: {count} > {high}"
            )

    # https://developer.hashicorp.com/nomad/api-docs/jobs#read-job-scale-status
    def status(self, request: Request) -> Any:
        namespace, job_id = request.namespace, request.params["job_id"]
        with self.state.lock:
            job = self.state.jobs.get((namespace, job_id))
            if job is None:
                raise NomadError(404, "job not found")
            events = self.state.scale_events.get((namespace, job_id), {})
            allocs = self.state.job_allocs(namespace, job_id, as_int(job.get("CreateIndex")))
            groups: Json = {}
            for group in job.get("TaskGroups") or []:
                name = str(group.get("Name"))
                live = [a for a in allocs if a.task_group == name and not a.terminal]
                groups[name] = {
                    "Desired": as_int(group.get("Count")),
                    "Placed": len(live),
                    "Running": sum(1 for a in live if a.client_status == "running"),
                    "Healthy": sum(1 for a in live if a.deployment_healthy is True),
                    "Unhealthy": sum(1 for a in live if a.deployment_healthy is False),
                    "Events": deep_copy(events.get(name)) or None,
                }
            return {
                "JobID": job_id,
                "Namespace": namespace,
                "JobStopped": bool(job.get("Stop")),
                "JobCreateIndex": job.get("CreateIndex"),
                "JobModifyIndex": job.get("JobModifyIndex"),
                "TaskGroups": groups,
            }
