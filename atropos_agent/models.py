"""Wire payloads shared by the executor service and the sandbox server.

Field names and defaults are a compatibility contract with existing trainers (see
docs/protocol.md): add fields, never rename or remove them.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The protocol's timeout rule: ``timeout_s``, else a numeric ``arguments.timeout``, clamped.
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 600.0
DEFAULT_TIMEOUT_S = 30.0


def new_call_id() -> str:
    return uuid.uuid4().hex


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    # The old service required an id; a missing one is generated so results can still be matched.
    uniq_id: str = Field(default_factory=new_call_id)


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
    path: str
    encoding: Literal["text", "base64"] = "text"
    max_bytes: int | None = Field(default=None, ge=0)
    include_sha256: bool = False


class ArtifactListFields(BaseModel):
    path: str = "."
    recursive: bool = False
    max_entries: int | None = Field(default=None, ge=0)


class ArtifactArchiveFields(BaseModel):
    path: str = "."
    format: Literal["tar.gz", "tgz"] = "tar.gz"
    max_bytes: int | None = Field(default=None, ge=0)
    max_entries: int | None = Field(default=None, ge=0)


class ExecuteRequest(BaseModel):
    trajectory_id: str = Field(min_length=1)
    tool: ToolCall
    timeout_s: float | None = None


class ExecuteBatchRequest(BaseModel):
    """New: many calls, possibly of many trajectories, in one request."""

    calls: list[ExecuteRequest]


class ExecuteBatchResponse(BaseModel):
    results: list[ToolResult]


class ReleaseRequest(BaseModel):
    trajectory_id: str
    reset_workspace: bool = False


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


class TrajectoriesResponse(BaseModel):
    total: int
    offset: int
    limit: int
    trajectories: list[TrajectoryInfo]


class ArtifactReadRequest(ArtifactReadFields):
    trajectory_id: str


class ArtifactListRequest(ArtifactListFields):
    trajectory_id: str


class ArtifactArchiveRequest(ArtifactArchiveFields):
    trajectory_id: str


def effective_timeout(timeout_s: float | None, arguments_timeout: object) -> float:
    """The protocol's rule: ``timeout_s``, else a numeric ``arguments.timeout``, clamped 1..600."""
    chosen: float = DEFAULT_TIMEOUT_S
    if timeout_s is not None:
        chosen = timeout_s
    elif isinstance(arguments_timeout, int | float) and not isinstance(arguments_timeout, bool):
        chosen = float(arguments_timeout)
    if math.isnan(chosen):
        chosen = DEFAULT_TIMEOUT_S
    return min(max(chosen, MIN_TIMEOUT_S), MAX_TIMEOUT_S)
