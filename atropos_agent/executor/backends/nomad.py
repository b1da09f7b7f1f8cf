"""The pool as one Nomad job: N allocations of the sandbox server, found through Nomad's API.

python-nomad is synchronous (requests), so every call runs in a worker thread, never on the
event loop. Nomad API pages used (https://developer.hashicorp.com/nomad/api-docs/...):

- ``status#read-leader``: is the cluster there
- ``variables#read-variable`` / ``#create-variable``: the sandboxes' shared token
- ``jobs#read-job``, ``jobs#create-job``: register, or update keeping live counts
- ``allocations#list-allocations`` (``resources=true``, ``filter``): where sandboxes listen;
  the job's own allocation list carries no addresses
- ``jobs#list-job-evaluations``: why allocations could not be placed
- ``jobs#scale-task-group``: the count
- ``allocations#stop-allocation``: replace one that no longer answers
- ``jobs#delete-job`` (``purge=true``): remove the pool
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import nomad
import nomad.api.exceptions as nomad_errors
import requests

from atropos_agent.errors import BackendError, SandboxUnavailable
from atropos_agent.executor.backends.base import Backend, SandboxInfo
from atropos_agent.executor.backends.nomad_job import (
    GROUP,
    PORT_LABEL,
    SPEC_HASH_META,
    build_job,
    token_variable_path,
)
from atropos_agent.executor.sandbox_client import SandboxClient
from atropos_agent.executor.settings import NomadSettings
from atropos_agent.executor.transport import Transport

log = logging.getLogger("atropos.backend.nomad")

T = TypeVar("T")
ALLOC_INDEX = re.compile(r"\[(\d+)\]$")
# Back-off between scale attempts after Nomad refused one (e.g. an active deployment).
SCALE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# Task events that mean the allocation will not come up without a change of spec.
FATAL_EVENTS = ("Driver Failure", "Not Restarting", "Failed Validation", "Setup Failure")


def nomad_message(exc: BaseException) -> str:
    response = getattr(exc, "nomad_resp", None)
    if isinstance(response, requests.Response):
        return f"HTTP {response.status_code}: {response.text.strip()[:300]}"
    return str(response or exc)


class NomadBackend(Backend):
    name = "nomad"

    def __init__(self, settings: NomadSettings, transport: Transport) -> None:
        self.settings = settings
        self.transport = transport
        self.job_id = settings.job_id
        self.token = ""
        verify: bool | str = settings.tls_verify
        if verify and settings.ca_cert:
            verify = str(settings.ca_cert)
        cert: tuple[str, ...] = ()
        if settings.client_cert and settings.client_key:
            cert = (str(settings.client_cert), str(settings.client_key))
        self.api = nomad.Nomad(
            address=settings.address,
            token=settings.acl_token,
            namespace=settings.namespace,
            region=settings.region,
            timeout=settings.timeout_s,
            verify=verify,
            cert=cert,
        )
        self.known: list[SandboxInfo] = []
        self.unreachable_since: float | None = None
        self.scale_failures = 0
        self.scale_not_before = 0.0
        self.registered_version: int | None = None

    # ---- calling Nomad

    async def call(self, what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one python-nomad call in a thread; failures become BackendError saying what."""
        try:
            result = await asyncio.to_thread(function, *args, **kwargs)
        except nomad_errors.URLNotAuthorizedNomadException as exc:
            raise BackendError(
                f"Nomad refused to {what} ({nomad_message(exc)}): check NOMAD_TOKEN and its "
                "ACL policy (the executor needs submit-job, read-job, list-jobs, scale-job, "
                "alloc-lifecycle, and variables read/write on nomad/jobs/<job> in namespace "
                f"{self.settings.namespace or 'default'}; see docs/operations.md)"
            ) from exc
        except (nomad_errors.BaseNomadException, requests.RequestException) as exc:
            answered = isinstance(
                exc, nomad_errors.URLNotFoundNomadException | nomad_errors.BadRequestNomadException
            )
            if not answered and self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
            raise BackendError(f"Nomad could not {what}: {nomad_message(exc)}") from exc
        self.unreachable_since = None
        return result

    # ---- life cycle

    async def start(self, count: int) -> None:
        address = self.settings.address
        try:
            leader = await self.call("name its leader", self.api.status.leader.get_leader)
        except BackendError as exc:
            raise BackendError(f"Nomad at {address} did not answer: {exc}") from exc
        log.info("event=nomad_connected address=%s leader=%s", address, leader)
        if (
            self.settings.driver == "docker"
            and self.settings.isolation == "bwrap"
            and not self.settings.privileged
        ):
            log.warning(
                "event=unprivileged_docker message='bubblewrap inside Docker needs a privileged "
                "container (Docker masks /proc); set TOOL_EXECUTOR_PRIVILEGED=true and allow it "
                "on the Nomad clients, or use TOOL_EXECUTOR_NOMAD_DRIVER=raw_exec. See "
                "docs/operations.md'"
            )
        self.token = await self._shared_token()
        await self._register()
        await self._wait_for(count)

    async def _shared_token(self) -> str:
        """The sandboxes' token, kept in a Nomad Variable so a restarted executor reuses it."""
        path = token_variable_path(self.job_id)
        try:
            variable = await self.call(
                "read the token variable",
                self.api.variable.get_variable,
                path,
                namespace=self.settings.namespace,
            )
            token = str(variable["Items"]["sandbox_token"])
            log.info("event=token_reused variable=%s", path)
            return token
        except BackendError as exc:
            if not isinstance(exc.__cause__, nomad_errors.URLNotFoundNomadException):
                raise
        token = secrets.token_urlsafe(32)
        payload = {
            "Namespace": self.settings.namespace or "default",
            "Path": path,
            "Items": {"sandbox_token": token},
        }
        await self.call(
            "store the token variable",
            self.api.variable.create_variable,
            path,
            payload,
            namespace=self.settings.namespace,
            cas=0,
        )
        log.info("event=token_created variable=%s", path)
        return token

    async def _register(self) -> None:
        job = build_job(self.settings)
        try:
            existing: dict[str, Any] | None = await self.call(
                "read the job",
                self.api.job.get_job,
                self.job_id,
                namespace=self.settings.namespace,
            )
        except BackendError as exc:
            if not isinstance(exc.__cause__, nomad_errors.URLNotFoundNomadException):
                raise
            existing = None
        if existing is not None and not existing.get("Stop"):
            running_hash = (existing.get("Meta") or {}).get(SPEC_HASH_META)
            if running_hash == job["Meta"][SPEC_HASH_META]:
                log.info("event=job_reused job=%s version=%s", self.job_id, existing.get("Version"))
                self.registered_version = existing.get("Version")
                return
            log.warning(
                "event=job_spec_differs job=%s running=%s configured=%s message='updating the "
                "job; Nomad replaces its allocations, so their workspaces are lost'",
                self.job_id,
                running_hash,
                job["Meta"][SPEC_HASH_META],
            )
        answer = await self.call(
            "register the job",
            self.api.jobs.register_job,
            {"Job": job, "PreserveCounts": existing is not None and not existing.get("Stop")},
        )
        log.info("event=job_registered job=%s eval=%s", self.job_id, answer.get("EvalID"))

    async def _wait_for(self, count: int) -> None:
        """Until ``count`` sandboxes answer /health; fail fast when Nomad says they cannot."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        while True:
            healthy = 0
            listed = await self.sandboxes()
            last = f"Nomad lists {len(listed)} running allocations"
            for info in listed:
                try:
                    await SandboxClient(info.url, self.transport).health()
                    healthy += 1
                except SandboxUnavailable as exc:
                    last = exc.message
            if healthy >= count:
                return
            reason = await self.why_not_running()
            if reason:
                raise BackendError(
                    f"sandbox allocations of job {self.job_id} cannot start: {reason}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{healthy} of {count} sandboxes healthy after "
                    f"{self.settings.start_timeout_s:g}s (job {self.job_id}): {last}; if they "
                    "only start slowly, raise TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S"
                )
            await asyncio.sleep(0.5)

    async def why_not_running(self) -> str | None:
        """The cause, read from evaluations and task events, when allocations cannot run."""
        evaluations = await self.call(
            "list evaluations",
            self.api.job.get_evaluations,
            self.job_id,
            namespace=self.settings.namespace,
        )
        for evaluation in sorted(evaluations, key=lambda e: e.get("CreateIndex", 0), reverse=True):
            failed = evaluation.get("FailedTGAllocs") or {}
            for group, metric in failed.items():
                return f"group {group!r} could not be placed: {describe_placement(metric)}"
            if evaluation.get("Status") == "complete":
                break
        allocations = await self.call(
            "list allocations",
            self.api.job.get_allocations,
            self.job_id,
            namespace=self.settings.namespace,
        )
        for allocation in allocations:
            for task, state in (allocation.get("TaskStates") or {}).items():
                events = state.get("Events") or []
                fatal = [e for e in events if e.get("Type") in FATAL_EVENTS]
                if fatal and (state.get("Failed") or allocation.get("ClientStatus") == "failed"):
                    story = "; ".join(
                        f"{e.get('Type')}: {e.get('DisplayMessage') or e.get('Message') or ''}"
                        for e in events[-4:]
                    )
                    return f"allocation {allocation.get('Name')} task {task} failed ({story})"
        return None

    async def stop(self) -> None:
        if not self.settings.purge_on_shutdown:
            log.info("event=job_kept job=%s", self.job_id)
            return
        try:
            await self.call(
                "purge the job",
                self.api.job.deregister_job,
                self.job_id,
                namespace=self.settings.namespace,
                purge=True,
            )
            log.info("event=job_purged job=%s", self.job_id)
        except BackendError as exc:
            log.error("event=job_purge_failed job=%s error=%s", self.job_id, exc)

    # ---- discovery

    async def sandboxes(self) -> list[SandboxInfo]:
        """Running allocations and where they listen. While Nomad is unreachable, the last
        known list stands: sandboxes keep serving their leases without Nomad."""
        selector = f'JobID == "{self.job_id}" and ClientStatus == "running"'
        allocations = await self.call(
            "list allocations",
            self.api.allocations.get_allocations,
            filter_=selector,
            resources=True,
            namespace=self.settings.namespace,
        )
        found = []
        for allocation in allocations:
            if allocation.get("DesiredStatus") != "run":
                continue
            address = allocation_address(allocation)
            if address is None:
                continue
            match = ALLOC_INDEX.search(allocation.get("Name", ""))
            found.append(
                SandboxInfo(
                    sandbox_id=allocation["ID"],
                    url=f"http://{address}",
                    index=int(match.group(1)) if match else 0,
                )
            )
        self.known = sorted(found, key=lambda info: info.index)
        return self.known

    # ---- scaling

    async def scale(self, count: int, idle: Collection[str]) -> None:
        if time.monotonic() < self.scale_not_before:
            return
        count = max(self.settings.min_sandboxes, min(count, self.settings.max_sandboxes))
        current = sorted(self.known, key=lambda info: info.index)
        if count < len(current):
            # Nomad stops the highest indexes: shrink only past a busy one, never through it.
            removable = 0
            for info in reversed(current):
                if info.sandbox_id not in idle:
                    break
                removable += 1
            count = max(count, len(current) - removable)
            if count == len(current):
                return
        payload = {
            "Count": count,
            "Target": {"Group": GROUP},
            "Message": f"atropos executor: {len(current)} -> {count} sandboxes",
        }
        try:
            await self.call(
                f"scale to {count}",
                self.api.job.request,
                self.job_id,
                "scale",
                method="post",
                json=payload,
            )
        except BackendError:
            delay = SCALE_BACKOFF_S[min(self.scale_failures, len(SCALE_BACKOFF_S) - 1)]
            self.scale_failures += 1
            self.scale_not_before = time.monotonic() + delay
            raise
        self.scale_failures = 0
        log.info("event=scaled job=%s from=%d to=%d", self.job_id, len(current), count)

    async def replace(self, sandbox_id: str) -> None:
        await self.call(
            f"stop allocation {sandbox_id}", self.api.allocation.stop_allocation, sandbox_id
        )

    def describe(self) -> dict[str, Any]:
        unreachable = (
            None
            if self.unreachable_since is None
            else round(time.monotonic() - self.unreachable_since, 1)
        )
        return {
            "backend": self.name,
            "address": self.settings.address,
            "job_id": self.job_id,
            "driver": self.settings.driver,
            "allocations": [
                {"sandbox_id": info.sandbox_id, "url": info.url, "index": info.index}
                for info in self.known
            ],
            "unreachable_for_s": unreachable,
            "scale_failures": self.scale_failures,
        }


def allocation_address(allocation: dict[str, Any]) -> str | None:
    """``HostIP:Value`` of the ``http`` port (AllocatedResources.Shared.Ports)."""
    shared = (allocation.get("AllocatedResources") or {}).get("Shared") or {}
    for port in shared.get("Ports") or []:
        if port.get("Label") == PORT_LABEL and port.get("Value"):
            host = port.get("HostIP") or ((shared.get("Networks") or [{}])[0].get("IP"))
            if host:
                return f"{host}:{port['Value']}"
    return None


def describe_placement(metric: dict[str, Any]) -> str:
    """Nomad's AllocationMetric, in one line a person can act on."""
    parts = []
    for key in ("ConstraintFiltered", "ClassFiltered", "DimensionExhausted", "ClassExhausted"):
        for reason, nodes in (metric.get(key) or {}).items():
            parts.append(f"{reason} ({nodes} nodes)")
    evaluated = metric.get("NodesEvaluated")
    if evaluated is not None:
        parts.append(f"{evaluated} nodes evaluated")
    if any("missing drivers" in part for part in parts):
        parts.append(
            "no client offers the task's driver: enable it on the Nomad clients, or "
            "set TOOL_EXECUTOR_NOMAD_DRIVER"
        )
    return "; ".join(parts) or "no node fits"
