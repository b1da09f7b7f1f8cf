"""Jobs: register/update, read, list, stop/purge, and a job's allocations, evaluations,
deployments and summary.

Validation mirrors Nomad's split: the HTTP layer answers 400 for a missing job, a missing
ID or an ID that does not match the path (command/agent/job_endpoint.go); the server's
``Job.Validate`` failures are uncoded errors, which Nomad's HTTP layer answers as 500 with
the go-multierror text (nomad/job_endpoint.go, nomad/structs/structs.go).
"""

from __future__ import annotations

from typing import Any

from .allocations import stub
from .common import Json, NomadError, as_int, deep_copy, get_list, multierror, now_ns
from .evaluations import deployment_json, eval_json
from .filter import compile_filter
from .jobspec import canonicalize, spec_changed, validate
from .scheduler import Scheduler
from .server import Reply, Request, Route, route
from .state import State

ENFORCE = "Enforcing job modify index"
JOB = "/v1/job/(?P<job_id>.+?)"


class JobsAPI:
    def __init__(self, state: State, scheduler: Scheduler) -> None:
        self.state = state
        self.scheduler = scheduler

    def routes(self) -> list[Route]:
        return [
            route("GET", "/v1/jobs", self.list_jobs),
            route("POST,PUT", "/v1/jobs", self.register),
            route("GET", JOB + "/allocations", self.allocations),
            route("GET", JOB + "/evaluations", self.evaluations),
            route("GET", JOB + "/deployments", self.deployments),
            route("GET", JOB + "/deployment", self.deployment),
            route("GET", JOB + "/summary", self.summary),
            route("GET", JOB, self.read),
            route("POST,PUT", JOB, self.register),
            route("DELETE", JOB, self.deregister),
        ]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#list-jobs
    def list_jobs(self, request: Request) -> Any:
        prefix = request.query.get("prefix", "")
        expression = request.query.get("filter", "")
        with self.state.lock:
            stubs = [
                self._stub(job, request.flag("meta"))
                for (namespace, job_id), job in sorted(self.state.jobs.items())
                if (request.namespace == "*" or namespace == request.namespace)
                and job_id.startswith(prefix)
            ]
        if expression:
            fields = set(stubs[0]) if stubs else {"ID", "Name", "Status", "Type", "Namespace"}
            matches = compile_filter(expression, fields)
            stubs = [s for s in stubs if matches(s)]
        return stubs

    # https://developer.hashicorp.com/nomad/api-docs/jobs#create-job
    # https://developer.hashicorp.com/nomad/api-docs/jobs#update-existing-job
    def register(self, request: Request) -> Any:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("Job"), dict):
            raise NomadError(400, "Job must be specified")
        submitted: Json = body["Job"]
        if submitted.get("ID") is None:
            raise NomadError(400, "Job ID hasn't been provided")
        path_id = request.params.get("job_id")
        if path_id is not None and submitted["ID"] != path_id:
            raise NomadError(400, "Job ID does not match name")
        if submitted.get("Type") == "system" and any(
            isinstance(g, dict) and g.get("Scaling") for g in get_list(submitted, "TaskGroups")
        ):
            raise NomadError(400, "Task groups with job type system do not support scaling blocks")
        region = submitted.get("Region") or request.query.get("region") or self.state.region
        if region != self.state.region:
            raise NomadError(500, "No path to region")
        namespace = str(submitted.get("Namespace") or request.namespace)
        job = canonicalize(submitted, namespace, self.state.region)
        job_id = str(job["ID"])
        errors = validate(job)
        if errors:
            raise NomadError(500, multierror(errors))
        with self.state.lock:
            if namespace not in self.state.namespaces:
                raise NomadError(500, f'job "{job_id}" is in nonexistent namespace "{namespace}"')
            existing = self.state.jobs.get((namespace, job_id))
            self._enforce_index(body, existing)
            if existing is not None and body.get("PreserveCounts"):
                counts = {g.get("Name"): g.get("Count") for g in get_list(existing, "TaskGroups")}
                for group in get_list(job, "TaskGroups"):
                    if group.get("Name") in counts:
                        group["Count"] = counts[group.get("Name")]
            changed = existing is None or spec_changed(existing, job)
            if changed:
                index = self.state.next_index()
                job.update(
                    Version=0 if existing is None else as_int(existing.get("Version")) + 1,
                    CreateIndex=index if existing is None else existing.get("CreateIndex"),
                    ModifyIndex=index,
                    JobModifyIndex=index,
                    SubmitTime=now_ns(),
                    Stable=False,
                    Status="pending" if existing is None else existing.get("Status"),
                    StatusDescription="",
                )
                self.state.jobs[(namespace, job_id)] = job
                ev = self.scheduler.new_eval(job, "job-register", index=index)
            else:
                assert existing is not None
                job = existing
                ev = self.scheduler.new_eval(job, "job-register")
            self.scheduler.process(ev, job)
            if changed:
                self.scheduler.start_deployment(job)
            return Reply(
                {
                    "EvalID": ev.id,
                    "EvalCreateIndex": ev.create_index,
                    "JobModifyIndex": job.get("JobModifyIndex"),
                    "Warnings": "",
                    "Index": ev.create_index,
                    "LastContact": 0,
                    "KnownLeader": False,
                },
                index=ev.create_index,
            )

    def _enforce_index(self, body: Json, existing: Json | None) -> None:
        if not body.get("EnforceIndex"):
            return
        wanted = as_int(body.get("JobModifyIndex"))
        if existing is not None:
            current = as_int(existing.get("JobModifyIndex"))
            if wanted == 0:
                raise NomadError(500, f"{ENFORCE} 0: job already exists")
            if wanted != current:
                raise NomadError(
                    500,
                    f"{ENFORCE} {wanted}: job exists with conflicting job modify index: {current}",
                )
        elif wanted != 0:
            raise NomadError(500, f"{ENFORCE} {wanted}: job does not exist")

    # https://developer.hashicorp.com/nomad/api-docs/jobs#read-job
    def read(self, request: Request) -> Any:
        with self.state.lock:
            return deep_copy(self._job(request))

    # https://developer.hashicorp.com/nomad/api-docs/jobs#stop-a-job
    def deregister(self, request: Request) -> Any:
        purge = request.flag("purge")
        key = (request.namespace, request.params["job_id"])
        with self.state.lock:
            job = self.state.jobs.get(key)
            if job is None:
                return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Index": 0}
            index = self.state.next_index()
            if purge:
                del self.state.jobs[key]
                job = deep_copy(job)
            else:
                job["Version"] = as_int(job.get("Version")) + 1
                job.update(ModifyIndex=index, JobModifyIndex=index, SubmitTime=now_ns())
            job["Stop"] = True
            ev = self.scheduler.new_eval(job, "job-deregister", index=index)
            self.scheduler.process(ev, job)
            self.scheduler.cancel_deployments(job, "Cancelled because job is stopped")
            return Reply(
                {
                    "EvalID": ev.id,
                    "EvalCreateIndex": index,
                    "JobModifyIndex": index,
                    "Index": index,
                    "LastContact": 0,
                    "KnownLeader": False,
                },
                index=index,
            )

    # https://developer.hashicorp.com/nomad/api-docs/jobs#list-job-allocations
    def allocations(self, request: Request) -> Any:
        namespace, job_id = request.namespace, request.params["job_id"]
        with self.state.lock:
            job = self.state.jobs.get((namespace, job_id))
            create_index = None
            if job is not None and not request.flag("all"):
                create_index = as_int(job.get("CreateIndex"))
            allocs = self.state.job_allocs(namespace, job_id, create_index)
            return [stub(alloc) for alloc in allocs]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#list-job-evaluations
    def evaluations(self, request: Request) -> Any:
        namespace, job_id = request.namespace, request.params["job_id"]
        with self.state.lock:
            evals = [
                e
                for e in self.state.evals.values()
                if e.namespace == namespace and e.job_id == job_id
            ]
            return [eval_json(e) for e in sorted(evals, key=lambda e: e.create_index, reverse=True)]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#list-job-deployments
    def deployments(self, request: Request) -> Any:
        with self.state.lock:
            return [deployment_json(d) for d in self._deployments(request)]

    # https://developer.hashicorp.com/nomad/api-docs/jobs#read-job-s-most-recent-deployment
    def deployment(self, request: Request) -> Any:
        with self.state.lock:
            found = self._deployments(request)
            return deployment_json(found[0]) if found else None

    def _deployments(self, request: Request) -> list[Any]:
        namespace, job_id = request.namespace, request.params["job_id"]
        found = [
            d
            for d in self.state.deployments.values()
            if d.namespace == namespace and d.job_id == job_id
        ]
        return sorted(found, key=lambda d: d.create_index, reverse=True)

    # https://developer.hashicorp.com/nomad/api-docs/jobs#read-job-summary
    def summary(self, request: Request) -> Any:
        with self.state.lock:
            return self._summary(self._job(request))

    def _job(self, request: Request) -> Json:
        job = self.state.jobs.get((request.namespace, request.params["job_id"]))
        if job is None:
            raise NomadError(404, "job not found")
        return job

    def _summary(self, job: Json) -> Json:
        namespace, job_id = str(job.get("Namespace")), str(job.get("ID"))
        allocs = self.state.job_allocs(namespace, job_id, as_int(job.get("CreateIndex")))
        blocked = [
            e
            for e in self.state.evals.values()
            if e.status == "blocked" and e.job_id == job_id and e.namespace == namespace
        ]
        summary: Json = {}
        for group in get_list(job, "TaskGroups"):
            name = group.get("Name")
            mine = [a for a in allocs if a.task_group == name]
            queued = 0
            for ev in blocked:
                origin = self.state.evals.get(ev.previous_eval)
                queued += origin.queued_allocations.get(str(name), 0) if origin else 0
            summary[str(name)] = {
                "Queued": queued,
                "Complete": sum(1 for a in mine if a.client_status == "complete"),
                "Failed": sum(1 for a in mine if a.client_status == "failed"),
                "Running": sum(1 for a in mine if a.client_status == "running"),
                "Starting": sum(1 for a in mine if a.client_status == "pending"),
                "Lost": sum(1 for a in mine if a.client_status == "lost"),
                "Unknown": 0,
            }
        return {
            "JobID": job_id,
            "Namespace": namespace,
            "Summary": summary,
            "Children": {"Pending": 0, "Running": 0, "Dead": 0},
            "CreateIndex": job.get("CreateIndex"),
            "ModifyIndex": job.get("ModifyIndex"),
        }

    def _stub(self, job: Json, meta: bool) -> Json:
        """structs.JobListStub."""
        stub_json: Json = {
            "ID": job.get("ID"),
            "ParentID": job.get("ParentID", ""),
            "Name": job.get("Name"),
            "Namespace": job.get("Namespace"),
            "Datacenters": deep_copy(job.get("Datacenters")),
            "NodePool": job.get("NodePool"),
            "Multiregion": None,
            "Type": job.get("Type"),
            "Priority": job.get("Priority"),
            "Periodic": False,
            "ParameterizedJob": False,
            "Stop": job.get("Stop"),
            "Status": job.get("Status"),
            "StatusDescription": job.get("StatusDescription", ""),
            "JobSummary": self._summary(job),
            "CreateIndex": job.get("CreateIndex"),
            "ModifyIndex": job.get("ModifyIndex"),
            "JobModifyIndex": job.get("JobModifyIndex"),
            "SubmitTime": job.get("SubmitTime"),
        }
        if meta:
            stub_json["Meta"] = deep_copy(job.get("Meta"))
        return stub_json
