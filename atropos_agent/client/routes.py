"""Every route of the executor as a ``Call``: the request to send, what its answer becomes,
whether it may be sent twice, and which trajectory it concerns (for routing and pinning)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import pydantic_core

from atropos_agent.client.transport import Answer, Request
from atropos_agent.errors import ExecutorError, ExecutorUnreachable
from atropos_agent.models import (
    MAX_TIMEOUT_S,
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    CancelResponse,
    DiffResponse,
    ExecuteBatchResponse,
    ForkResponse,
    GroupReleaseResponse,
    LeaseOptions,
    OutputChunk,
    ReleaseResponse,
    StatusResponse,
    TemplateDeleteResponse,
    TemplateInfo,
    TemplatesResponse,
    ToolCall,
    ToolResult,
    TrajectoryInfo,
    UploadResponse,
)

# The read timeout covers the longest command the service honours, plus its grace.
READ_TIMEOUT_S = MAX_TIMEOUT_S + 90
RETRIES = 3
# The longest wait a Retry-After may impose before the next attempt.
MAX_RETRY_WAIT_S = 10.0

T = TypeVar("T")
A = TypeVar("A", ArtifactReadResponse, ArtifactListResponse, ArtifactArchiveResponse)
JSON_HEADERS = {"Content-Type": "application/json"}
GZIP_HEADERS = {"Content-Type": "application/gzip"}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to the service, and how its answer's JSON becomes the value returned."""

    method: Literal["GET", "POST", "PUT", "DELETE"]
    path: str
    body: dict[str, Any] | None
    # The answer's JSON bytes to the value returned.
    parse: Callable[[bytes], T]
    # Sending it twice does no harm: it only reads, or the service runs it once.
    idempotent: bool = False
    # A raw body (an archive) instead of ``body``, and the query.
    content: bytes | None = None
    params: dict[str, Any] | None = None
    # The trajectory it concerns (routed to its executor), and whether it may take the
    # trajectory's lease (which pins the trajectory to that executor), with ``group``.
    trajectory_id: str | None = None
    leases: bool = False
    group: str | None = None

    def request(self, base_url: str, headers: dict[str, str], read_timeout_s: float) -> Request:
        if self.content is not None:
            body, kind = self.content, GZIP_HEADERS
        elif self.body is not None:
            body, kind = pydantic_core.to_json(self.body), JSON_HEADERS
        else:
            body, kind = None, {}
        params = None
        if self.params:
            params = {key: str(value) for key, value in self.params.items()}
        return Request(
            self.method, base_url + self.path, body, {**headers, **kind}, params, read_timeout_s
        )

    def answer(self, answer: Answer) -> T:
        """The parsed answer; ``ExecutorError`` when the service refused the request."""
        if answer.status >= 400:
            raise ExecutorError(answer.status, error_message(answer.body))
        return self.parse(answer.body)


def error_message(body: bytes) -> str:
    """The service's own words (``{"error": ...}``, or FastAPI's ``detail``), else the body."""
    text = body.decode(errors="replace")
    try:
        document = json.loads(body)
    except ValueError:
        return text
    if isinstance(document, dict):
        return str(document.get("error") or document.get("detail") or text)
    return text


def retry_delay(
    call: Call[Any], attempt: int, retries: int, outcome: Answer | Exception
) -> float | None:
    """Seconds to wait before sending ``call`` again, or None to give ``outcome`` back.

    Retried: a request that never left, a 503 that says when to come back (the service ran
    nothing), and a request safe to repeat whose connection broke (not one that timed out:
    it already waited the longest a command may take)."""
    if attempt >= retries:
        return None
    backoff: float = 0.1 * 2**attempt
    if isinstance(outcome, Answer):
        if outcome.status != 503 or not outcome.retry_after.isdigit():
            return None
        return float(min(max(float(outcome.retry_after), backoff), MAX_RETRY_WAIT_S))
    if not isinstance(outcome, ExecutorUnreachable):
        return None
    if not outcome.sent or (call.idempotent and not outcome.timed_out):
        return backoff
    return None


def stream_event(line: bytes) -> OutputChunk | ToolResult:
    event = json.loads(line)
    if event.get("type") == "output":
        return OutputChunk.model_validate(event)
    event.pop("type", None)
    return ToolResult.model_validate(event)


# ---- the routes


def execute(
    trajectory_id: str,
    tool: str,
    arguments: dict[str, Any] | None,
    timeout_s: float | None,
    uniq_id: str | None = None,
    lease: LeaseOptions | None = None,
) -> Call[ToolResult]:
    call = ToolCall(name=tool, arguments=arguments or {})
    if uniq_id is not None:
        call.uniq_id = uniq_id
    body = {"trajectory_id": trajectory_id, "tool": call.model_dump(), "timeout_s": timeout_s}
    if lease is not None:
        body.update(lease.model_dump(exclude_none=True))
    group = lease.group if lease is not None else None
    parse = ToolResult.model_validate_json
    return Call(
        "POST", "/execute", body, parse, True, trajectory_id=trajectory_id, leases=True, group=group
    )


def open_trajectory(trajectory_id: str, lease: LeaseOptions) -> Call[TrajectoryInfo]:
    body = {"trajectory_id": trajectory_id, **lease.model_dump(exclude_none=True)}
    parse = TrajectoryInfo.model_validate_json
    # Taking a lease twice gives the same lease.
    return Call(
        "POST", "/trajectories", body, parse, True, trajectory_id=trajectory_id, leases=True,
        group=lease.group,
    )  # fmt: skip


def cancel(trajectory_id: str) -> Call[CancelResponse]:
    body = {"trajectory_id": trajectory_id}
    parse = CancelResponse.model_validate_json
    return Call("POST", "/cancel", body, parse, True, trajectory_id=trajectory_id)


def release_group(group: str, reset_workspace: bool) -> Call[GroupReleaseResponse]:
    body = {"group": group, "reset_workspace": reset_workspace}
    return Call("POST", "/release", body, GroupReleaseResponse.model_validate_json)


def batch_results(answer: bytes) -> list[ToolResult]:
    return ExecuteBatchResponse.model_validate_json(answer).results


def execute_batch(calls: list[dict[str, Any]]) -> Call[list[ToolResult]]:
    return Call("POST", "/execute_batch", {"calls": calls}, batch_results)


def release(trajectory_id: str, reset_workspace: bool) -> Call[ReleaseResponse]:
    body = {"trajectory_id": trajectory_id, "reset_workspace": reset_workspace}
    parse = ReleaseResponse.model_validate_json
    return Call("POST", "/release", body, parse, trajectory_id=trajectory_id)


def artifact(
    route: str, answer: type[A], trajectory_id: str, path: str, options: dict[str, Any]
) -> Call[A]:
    body = {"trajectory_id": trajectory_id, "path": path, **options}
    parse = answer.model_validate_json
    return Call("POST", f"/artifacts/{route}", body, parse, True, trajectory_id=trajectory_id)


def status() -> Call[StatusResponse]:
    return Call("GET", "/status", None, StatusResponse.model_validate_json, idempotent=True)


def upload(
    trajectory_id: str,
    archive: bytes,
    path: str,
    format: Literal["tar.gz", "file"],
    template: str | None,
    lease: LeaseOptions | None,
) -> Call[UploadResponse]:
    options = lease.model_copy() if lease is not None else LeaseOptions()
    if template is not None:
        options.template = template
    params = {"path": path, "format": format, **options.model_dump(exclude_none=True)}
    where = f"/trajectories/{quote(trajectory_id, safe='')}/archive"
    parse = UploadResponse.model_validate_json
    return Call(
        "PUT", where, None, parse, content=archive, params=params, trajectory_id=trajectory_id,
        leases=True, group=options.group,
    )  # fmt: skip


def create_template(
    name: str, archive: bytes | None, trajectory_id: str | None
) -> Call[TemplateInfo]:
    if (archive is None) == (trajectory_id is None):
        raise ValueError("give exactly one of local_path, archive and trajectory_id")
    parse = TemplateInfo.model_validate_json
    if trajectory_id is not None:
        body = {"name": name, "trajectory_id": trajectory_id}
        return Call("POST", "/templates", body, parse, trajectory_id=trajectory_id)
    # Storing the same archive under the same name twice gives the same template.
    where = f"/templates/{quote(name, safe='')}"
    return Call("PUT", where, None, parse, idempotent=True, content=archive)


def template_list(answer: bytes) -> list[TemplateInfo]:
    return TemplatesResponse.model_validate_json(answer).templates


def list_templates() -> Call[list[TemplateInfo]]:
    return Call("GET", "/templates", None, template_list, idempotent=True)


def delete_template(name: str) -> Call[TemplateDeleteResponse]:
    where = f"/templates/{quote(name, safe='')}"
    return Call("DELETE", where, None, TemplateDeleteResponse.model_validate_json)


def fork(
    trajectory_id: str,
    new_trajectory_ids: list[str],
    group: str | None,
    lease_ttl_s: float | None,
) -> Call[ForkResponse]:
    body: dict[str, Any] = {
        "trajectory_id": trajectory_id,
        "new_trajectory_ids": list(new_trajectory_ids),
    }
    body.update({k: v for k, v in (("group", group), ("lease_ttl_s", lease_ttl_s)) if v})
    return Call(
        "POST", "/fork", body, ForkResponse.model_validate_json, trajectory_id=trajectory_id
    )


def diff(trajectory_id: str) -> Call[DiffResponse]:
    body = {"trajectory_id": trajectory_id}
    parse = DiffResponse.model_validate_json
    return Call("POST", "/artifacts/diff", body, parse, True, trajectory_id=trajectory_id)
