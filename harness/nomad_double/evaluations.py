"""Evaluations (and deployments, which the job endpoints list)."""

from __future__ import annotations

from typing import Any

from .allocations import stub
from .common import Json, NomadError, deep_copy, rfc3339
from .server import Request, Route, route
from .state import Deployment, Evaluation, State


def eval_json(ev: Evaluation) -> Json:
    """structs.Evaluation."""
    return {
        "ID": ev.id,
        "Namespace": ev.namespace,
        "Priority": ev.priority,
        "Type": ev.type,
        "TriggeredBy": ev.triggered_by,
        "JobID": ev.job_id,
        "JobModifyIndex": ev.job_modify_index,
        "NodeID": "",
        "NodeModifyIndex": 0,
        "DeploymentID": ev.deployment_id,
        "Status": ev.status,
        "StatusDescription": ev.status_description,
        "Wait": 0,
        "WaitUntil": rfc3339(ev.wait_until),
        "NextEval": ev.next_eval,
        "PreviousEval": ev.previous_eval,
        "BlockedEval": ev.blocked_eval,
        "RelatedEvals": None,
        "FailedTGAllocs": deep_copy(ev.failed_tg_allocs),
        "ClassEligibility": None,
        "EscapedComputedClass": False,
        "QuotaLimitReached": "",
        "AnnotatePlan": False,
        "QueuedAllocations": dict(ev.queued_allocations),
        "LeaderACL": "",
        "SnapshotIndex": ev.create_index,
        "CreateIndex": ev.create_index,
        "ModifyIndex": ev.modify_index,
        "CreateTime": ev.create_time,
        "ModifyTime": ev.modify_time,
    }


def deployment_json(deployment: Deployment) -> Json:
    """structs.Deployment."""
    return {
        "ID": deployment.id,
        "Namespace": deployment.namespace,
        "JobID": deployment.job_id,
        "JobVersion": deployment.job_version,
        "JobModifyIndex": deployment.job_modify_index,
        "JobSpecModifyIndex": deployment.job_modify_index,
        "JobCreateIndex": deployment.job_create_index,
        "IsMultiregion": False,
        "TaskGroups": deep_copy(deployment.task_groups),
        "Status": deployment.status,
        "StatusDescription": deployment.status_description,
        "EvalPriority": 50,
        "CreateIndex": deployment.create_index,
        "ModifyIndex": deployment.modify_index,
        "CreateTime": deployment.create_time,
        "ModifyTime": deployment.modify_time,
    }


class EvaluationsAPI:
    def __init__(self, state: State) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            route("GET", "/v1/evaluations", self.list_evaluations),
            route("GET", "/v1/evaluation/(?P<eval_id>[^/]+)/allocations", self.allocations),
            route("GET", "/v1/evaluation/(?P<eval_id>[^/]+)", self.read),
        ]

    # https://developer.hashicorp.com/nomad/api-docs/evaluations#list-evaluations
    def list_evaluations(self, request: Request) -> Any:
        prefix = request.query.get("prefix", "")
        job_id = request.query.get("job")
        status = request.query.get("status")
        with self.state.lock:
            evals = sorted(self.state.evals.values(), key=lambda e: (e.create_index, e.id))
            return [
                eval_json(ev)
                for ev in evals
                if (request.namespace == "*" or ev.namespace == request.namespace)
                and ev.id.startswith(prefix)
                and (job_id is None or ev.job_id == job_id)
                and (status is None or ev.status == status)
            ]

    # https://developer.hashicorp.com/nomad/api-docs/evaluations#read-evaluation
    def read(self, request: Request) -> Any:
        with self.state.lock:
            ev = self.state.evals.get(request.params["eval_id"])
            if ev is None:
                raise NomadError(404, "eval not found")
            return eval_json(ev)

    # https://developer.hashicorp.com/nomad/api-docs/evaluations#list-allocations-for-evaluation
    def allocations(self, request: Request) -> Any:
        with self.state.lock:
            eval_id = request.params["eval_id"]
            allocs = [a for a in self.state.allocs.values() if a.eval_id == eval_id]
            return [stub(a) for a in sorted(allocs, key=lambda a: a.create_index)]
