"""Wire payloads shared by the executor service and the sandbox server.

Field names and defaults are a compatibility contract with existing trainers (see
docs/protocol.md): add fields, never rename or remove them.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# The protocol's timeout rule: ``timeout_s``, else a numeric ``arguments.timeout``, clamped.
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 600.0
DEFAULT_TIMEOUT_S = 30.0


# ---- what a request may hold (docs/protocol.md, "Input rules"): ids short and printable,
# paths without NUL, arguments not nested without end. A request over a bound is refused
# with 422 naming the field, before anything runs.

# An id (trajectory, call, tool, slot) is a name, not data: room for a uuid and a prefix or
# two, printable so that logs, errors and /trajectories show it as it is.
MAX_ID_CHARS = 256
# Linux's PATH_MAX: no longer path can be opened.
MAX_PATH_CHARS = 4096
# Nesting of a call's arguments: far beyond what a tool reads, well within what every JSON
# encoder on the path takes (pydantic-core's stops near 255 levels, Python's json near 1000).
MAX_ARGUMENT_DEPTH = 64
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
CONTAINERS = (dict, list)


def printable(value: str) -> str:
    # isprintable() is the cheap common case; it also refuses harmless characters (NBSP).
    if not value.isprintable() and CONTROL_CHARACTER.search(value) is not None:
        raise ValueError("must not contain control characters (NUL, U+0001..U+001F, DEL)")
    return value


def without_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def nested_at_most(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` when its containers nest at most ``MAX_ARGUMENT_DEPTH`` levels."""
    level: list[Any] = [child for child in value.values() if isinstance(child, CONTAINERS)]
    depth = 1
    while level:  # empty at once for the common flat arguments
        depth += 1
        if depth > MAX_ARGUMENT_DEPTH:
            raise ValueError(f"must not nest deeper than {MAX_ARGUMENT_DEPTH} levels")
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, CONTAINERS)
        ]
    return value


# Text of an id that may be empty (a tool's name: an empty one is an unknown tool).
IdText = Annotated[str, Field(max_length=MAX_ID_CHARS), AfterValidator(printable)]
# An id that names something, so it cannot be empty.
Identifier = Annotated[IdText, Field(min_length=1)]
# A path inside a workspace, as the caller writes it.
PathText = Annotated[str, Field(max_length=MAX_PATH_CHARS), AfterValidator(without_nul)]
# A tool call's arguments: free, as the model wrote them, but of bounded depth.
Arguments = Annotated[dict[str, Any], AfterValidator(nested_at_most)]


def new_call_id() -> str:
    return uuid.uuid4().hex


class ToolCall(BaseModel):
    name: IdText
    arguments: Arguments = Field(default_factory=dict)
    # The old service required an id; a missing one is generated so results can still be matched.
    uniq_id: IdText = Field(default_factory=new_call_id)


class ToolResult(BaseModel):
    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    uniq_id: str | None = None

    @classmethod
    def failure(cls, message: str, **metadata: Any) -> ToolResult:
        """A call that could not run; ``metadata`` says why in machine-readable form."""
        return cls(success=False, error=message, metadata=metadata)


class ArtifactReadResponse(BaseModel):
    success: bool
    content: str = ""
    error: str = ""
    encoding: Literal["text", "base64"] = "text"
    truncated: bool = False
    bytes: int = 0
    file_size: int | None = None
    path: str = ""
    mime: str | None = None
    # The hash of the bytes returned (the old service's); new: the whole file's beside it.
    sha256: str | None = None
    file_sha256: str | None = None


class ArtifactEntry(BaseModel):
    path: str
    is_dir: bool
    size: int
    mtime: float


class ArtifactListResponse(BaseModel):
    success: bool
    entries: list[ArtifactEntry] = Field(default_factory=list)
    truncated: bool = False
    error: str = ""


class ArtifactArchiveResponse(BaseModel):
    success: bool
    content: str = ""
    error: str = ""
    encoding: Literal["base64"] = "base64"
    format: Literal["tar.gz"] = "tar.gz"
    bytes: int = 0
    entry_count: int = 0
    # New: more files than max_entries; the archive holds the first ones.
    truncated: bool = False


class ArtifactReadFields(BaseModel):
    path: PathText
    encoding: Literal["text", "base64"] = "text"
    max_bytes: int | None = Field(default=None, ge=0)
    include_sha256: bool = False


class ArtifactListFields(BaseModel):
    path: PathText = "."
    recursive: bool = False
    max_entries: int | None = Field(default=None, ge=0)


class ArtifactArchiveFields(BaseModel):
    path: PathText = "."
    format: Literal["tar.gz", "tgz"] = "tar.gz"
    max_bytes: int | None = Field(default=None, ge=0)
    max_entries: int | None = Field(default=None, ge=0)


# A lease's lifetime a trainer may set (docs/executor.md): at most a day.
LeaseTTL = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]


class LeaseOptions(BaseModel):
    """New: what a trainer may say of a lease when it is taken (ignored on later calls, but
    for ``template``: naming another than the lease's is refused)."""

    # A name the trainer groups trajectories by (its run, its step): release them in one call.
    group: Identifier | None = None
    # The lease ends this many seconds after it was taken, as an idle one expires.
    lease_ttl_s: LeaseTTL | None = None
    # The workspace starts as this template's files (POST /templates), not empty.
    template: Identifier | None = None


class ExecuteRequest(LeaseOptions):
    trajectory_id: Identifier
    tool: ToolCall
    timeout_s: float | None = None


class OutputChunk(BaseModel):
    """New: a line of ``POST /execute/stream``: output of the call as its command printed it
    (``stream``: ``stdout``, ``stderr``, or ``output`` when the two are merged). The last line
    is ``{"type": "result", ...}``, the call's ToolResult."""

    type: Literal["output"] = "output"
    stream: str
    data: str


class ExecuteBatchRequest(BaseModel):
    """New: many calls, possibly of many trajectories, in one request."""

    calls: list[ExecuteRequest]


class ExecuteBatchResponse(BaseModel):
    results: list[ToolResult]


class ReleaseRequest(BaseModel):
    """One trajectory, or (new) every trajectory of a ``group``."""

    # Non-empty like every trajectory id: an empty one can never have held a lease.
    trajectory_id: Identifier | None = None
    group: Identifier | None = None
    reset_workspace: bool = False

    @model_validator(mode="after")
    def one_target(self) -> ReleaseRequest:
        if (self.trajectory_id is None) == (self.group is None):
            raise ValueError("give exactly one of trajectory_id and group")
        return self


class GroupReleaseResponse(BaseModel):
    status: Literal["ok"] = "ok"
    group: str
    # Trajectories of the group that were known (holding a lease, or ended and not released).
    released: int


class TrajectoryRequest(LeaseOptions):
    """``POST /trajectories``: take a lease without running anything."""

    trajectory_id: Identifier


class CancelRequest(BaseModel):
    trajectory_id: Identifier


class CancelResponse(BaseModel):
    trajectory_id: str
    # The uniq_ids of the calls stopped: the one running, and those queued behind it.
    cancelled: list[str]


class ReleaseResponse(BaseModel):
    status: Literal["ok"] = "ok"
    # False when the trajectory held no slot any more (its lease had expired or was lost).
    released: bool
    note: str | None = None


class ServiceInfo(BaseModel):
    """``GET /``."""

    message: str
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "degraded"]
    reason: str | None = None
    # New: how the sandboxes build workspaces from templates and forks ("overlay": copy-on-
    # write; "copy": a real copy each; "mixed"), once one serves.
    workspace_layers: str | None = None


class StatusResponse(BaseModel):
    """``GET /status``: the old service's keys, and everything new beside them."""

    model_config = ConfigDict(extra="allow")

    queue_size: int
    total_requests: int
    total_errors: int
    pool: dict[str, Any]


class ToolsResponse(BaseModel):
    """``GET /tools``: OpenAI-style function schemas."""

    tools: list[dict[str, Any]]


class TrajectoryInfo(BaseModel):
    trajectory_id: str
    sandbox_id: str | None
    slot_id: str | None
    age_s: float
    idle_s: float
    calls: int
    in_flight: int
    group: str | None = None
    # Seconds until the lease ends by its lifetime (lease_ttl_s or the maximum lease age);
    # None when only idle expiry applies.
    expires_in_s: float | None = None
    # What the workspace started from: a template's name, or the trajectory it was forked from.
    template: str | None = None
    forked_from: str | None = None


class TrajectoriesResponse(BaseModel):
    total: int
    offset: int
    limit: int
    trajectories: list[TrajectoryInfo]


class ArtifactReadRequest(ArtifactReadFields):
    trajectory_id: Identifier


class ArtifactListRequest(ArtifactListFields):
    trajectory_id: Identifier


class ArtifactArchiveRequest(ArtifactArchiveFields):
    trajectory_id: Identifier


# ---- workspaces: uploads, templates, forks, diffs (docs/executor.md, "Preparing once,
# running many")

# How many trajectories one POST /fork makes: a GRPO group is 8 to 64 rollouts.
MAX_FORKS = 256


class UploadOptions(LeaseOptions):
    """Where an upload goes (``path``, from the workspace root) and what it is: a tar.gz
    extracted there, or one file written there. The query of ``PUT
    /trajectories/{trajectory_id}/archive``; the lease options count when the upload takes the
    trajectory's lease."""

    path: PathText = "."
    format: Literal["tar.gz", "file"] = "tar.gz"


class UploadRequest(UploadOptions):
    """``POST /artifacts/upload``: the upload as base64 in JSON (``content``)."""

    trajectory_id: Identifier
    # Base64 of the archive (format "tar.gz") or of the file's bytes (format "file").
    content: str


class UploadResponse(BaseModel):
    """An upload (both hops): a refused archive is ``success: false`` with the member and the
    reason in ``error``, and nothing of it written."""

    success: bool
    error: str = ""
    # Bytes of the archive received, and the entries it held.
    bytes: int = 0
    entry_count: int = 0


class TemplateRequest(BaseModel):
    """``POST /templates``: a template from an archive (``content``, base64 tar.gz), or from
    the files of a live trajectory's workspace (``trajectory_id``)."""

    name: Identifier
    content: str | None = None
    trajectory_id: Identifier | None = None

    @model_validator(mode="after")
    def one_source(self) -> TemplateRequest:
        if (self.content is None) == (self.trajectory_id is None):
            raise ValueError("give exactly one of content and trajectory_id")
        return self


class TemplateInfo(BaseModel):
    name: str
    # Size of the template's tar.gz, its entries, and the sha256 of its bytes.
    bytes: int
    entry_count: int
    sha256: str
    created_at: float = 0.0


class TemplatesResponse(BaseModel):
    templates: list[TemplateInfo]


class TemplateDeleteResponse(BaseModel):
    status: Literal["ok"] = "ok"
    name: str


class ForkRequest(BaseModel):
    """``POST /fork``: new trajectories whose workspaces start as the source's files now."""

    trajectory_id: Identifier
    new_trajectory_ids: Annotated[list[Identifier], Field(min_length=1, max_length=MAX_FORKS)]
    # The new leases' group (default: the source's) and lifetime.
    group: Identifier | None = None
    lease_ttl_s: LeaseTTL | None = None

    @model_validator(mode="after")
    def distinct_ids(self) -> ForkRequest:
        if len(set(self.new_trajectory_ids)) != len(self.new_trajectory_ids):
            raise ValueError("new_trajectory_ids must not repeat an id")
        if self.trajectory_id in self.new_trajectory_ids:
            raise ValueError("new_trajectory_ids must not hold the source trajectory_id")
        return self


class ForkedTrajectory(BaseModel):
    trajectory_id: str
    sandbox_id: str
    slot_id: str


class ForkResponse(BaseModel):
    trajectory_id: str
    forks: list[ForkedTrajectory]


class DiffRequest(BaseModel):
    trajectory_id: Identifier


class DiffResponse(BaseModel):
    """``POST /artifacts/diff``: what changed since the workspace's template or fork source."""

    success: bool
    error: str = ""
    # Base64 tar.gz of the files, links and new directories added or changed.
    content: str = ""
    encoding: Literal["base64"] = "base64"
    format: Literal["tar.gz"] = "tar.gz"
    # Paths (from the workspace root) that are gone, and those added or changed.
    deleted: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)
    bytes: int = 0
    entry_count: int = 0


def effective_timeout(timeout_s: float | None, arguments_timeout: object) -> float:
    """The protocol's rule: ``timeout_s``, else a numeric ``arguments.timeout``, clamped 1..600."""
    chosen: float = DEFAULT_TIMEOUT_S
    if timeout_s is not None:
        chosen = timeout_s
    elif isinstance(arguments_timeout, int | float) and not isinstance(arguments_timeout, bool):
        # An int beyond any float (10**400) is longer than any timeout.
        chosen = float(min(max(arguments_timeout, -MAX_TIMEOUT_S), MAX_TIMEOUT_S))
    if math.isnan(chosen):
        chosen = DEFAULT_TIMEOUT_S
    return min(max(chosen, MIN_TIMEOUT_S), MAX_TIMEOUT_S)
