"""The executor ↔ sandbox server hop: every payload, imported by both ends.

Version 1 is the old containers' protocol (``/batch``, ``/execute``, ``/reset``, ``/slots``,
``/artifacts/*`` keyed by ``slot_id``); version 2 keeps its shapes, adds fields, and adds
``POST /batch/stream``; version 3 adds ``POST /cancel`` and slot owners (an item's ``lease``,
``POST /slots/owner``, ``owner`` in ``/slots``); version 4 adds ``POST /execute/stream``;
version 5 adds workspaces: layers (``/layers``), slots started on them, forks, diffs, exports
and uploads. See docs/protocol.md.

Names: a call's id is ``uniq_id`` in code on both sides, as the trainer names it; on this hop
its wire name is ``execution_id``, the old containers' name for it. ``index`` in a streamed
line is the item's position in its batch, which is how a result finds its call (ids are the
trainer's and need not be unique).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from atropos_agent.models import (
    Arguments,
    ArtifactArchiveFields,
    ArtifactListFields,
    ArtifactReadFields,
    Identifier,
    IdText,
)

PROTOCOL_VERSION = 5
# The oldest sandbox protocol this executor drives: it needs POST /batch/stream.
MIN_PROTOCOL_VERSION = 2
# The first protocol with POST /cancel and slot owners: an older sandbox has neither route and
# ignores an item's ``lease``, so an executor asks it for neither.
CANCEL_AND_OWNER_VERSION = 3
# The first protocol with POST /execute/stream (a call's output as it prints): an executor
# falls back to a plain call on an older sandbox.
STREAM_VERSION = 4
# The first protocol with workspaces: layers, POST /slots/{id}/workspace, fork, diff, export,
# PUT /slots/{id}/archive. An older sandbox can only give a trajectory an empty workspace.
WORKSPACES_VERSION = 5


class WireModel(BaseModel):
    """Python names in code, the hop's names on the wire."""

    model_config = ConfigDict(
        validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


class SlotLease(BaseModel):
    """A lease on a slot as the executor records it there: the sandbox keeps it as the slot's
    owner and shows it in ``/slots``, so that an executor started again can adopt the leases
    of a sandbox that outlived it. The sandbox never acts on it (expiry is the executor's)."""

    trajectory_id: Identifier
    group: Identifier | None = None
    # Unix time the lease expires at; None: it expires only when idle, by the executor's rule.
    expires_at: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class BatchItem(WireModel):
    """One tool call for one slot.

    ``args.allow_network: false`` (the old executor's per-item switch) runs the call without
    network even on a server that allows it; ``true`` never widens the server's setting.
    ``lease`` (protocol 3) records the caller's lease as the slot's owner when the call runs.
    """

    # The executor's calls pass the same bounds (models.ToolCall), so it never sends an item
    # the sandbox refuses; an item over them from anyone else fails alone.
    slot_id: Identifier
    tool: IdText
    args: Arguments = Field(default_factory=dict)
    uniq_id: IdText | None = Field(default=None, alias="execution_id")
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    lease: SlotLease | None = None


class BatchResult(WireModel):
    """What one call produced; a failed tool is ``success: false``, never an HTTP error."""

    success: bool
    output: str = ""
    error: str = ""
    uniq_id: str | None = Field(default=None, alias="execution_id")
    metadata: dict[str, Any] = Field(default_factory=dict)


class StreamedResult(BatchResult):
    """One NDJSON line of ``POST /batch/stream``, sent as soon as its call finishes."""

    index: int


class OutputEvent(BaseModel):
    """A line of ``POST /execute/stream`` (protocol 4): output of the call as it printed it.
    ``stream`` is ``stdout`` or ``stderr`` (``output`` when the two are merged)."""

    type: Literal["output"]
    stream: str
    data: str


class ResultEvent(BatchResult):
    """The last line of ``POST /execute/stream``: the call's result."""

    type: Literal["result"]


STREAM_EVENT: TypeAdapter[OutputEvent | ResultEvent] = TypeAdapter(
    Annotated[OutputEvent | ResultEvent, Field(discriminator="type")]
)


class SandboxHealth(BaseModel):
    """``GET /health`` (open, for orchestrators' checks)."""

    status: str
    slots: int
    busy_slots: int
    isolation: str
    network: bool
    version: str
    # Protocol 1 sandboxes did not report these; absent means 1 and a sandbox never seen before.
    protocol_version: int = 1
    uptime_s: float = 0.0
    # New at every start: a sandbox restarted at the same address is a different sandbox.
    instance_id: str = ""
    # How workspaces made of layers are built (protocol 5): "overlay" (copy-on-write) or
    # "copy"; None: a sandbox without workspaces.
    workspace_layers: Literal["overlay", "copy"] | None = None
    # Slots by readiness (docs/sandbox.md, "Warm slots"): free with their agent started
    # (warm), free without (cold), and the others (leased: an owner, or a call since their
    # reset); ``warm_target`` is how many free slots the sandbox keeps warm. None: a sandbox
    # that starts every slot before it is healthy (all free slots warm).
    warm_slots: int | None = None
    cold_slots: int | None = None
    leased_slots: int | None = None
    warm_target: int | None = None


class SlotState(BaseModel):
    """One slot in ``GET /slots``."""

    slot_id: str
    busy: bool = False
    pending: int = 0
    # Calls the slot ran since the sandbox started: a slot with calls holds someone's files.
    calls: int = 0
    restarts: int = 0
    pid: int | None = None
    alive: bool = False
    started_at: float | None = None
    # The network mode the slot's agent runs in (a call may switch it; see docs/sandbox.md).
    network: bool | None = None
    # The lease last recorded on the slot (protocol 3); None: none since its last reset.
    owner: SlotLease | None = None
    # Free with its agent started on a wiped workspace (docs/sandbox.md, "Warm slots"); None:
    # a sandbox that does not say.
    warm: bool | None = None


class SlotsResponse(BaseModel):
    slots: list[SlotState]


class SlotRequest(BaseModel):
    slot_id: Identifier


class CancelResponse(BaseModel):
    """``POST /cancel``: whether a call was running in the slot and was stopped."""

    slot_id: str
    cancelled: bool


class SlotOwnerRequest(BaseModel):
    """``POST /slots/owner``: record ``lease`` as the slot's owner (null: no owner), running
    nothing; answered with the slot's state."""

    slot_id: Identifier
    lease: SlotLease | None


class ResetResponse(BaseModel):
    """``POST /reset``: the old containers' answer (``success``, ``output``, ``error``,
    ``metadata``), with ours (``status``, ``slot_id``) beside it. Every field but ``slot_id``
    has a default, so either side's answer parses."""

    success: bool = True
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: str = "ok"
    slot_id: str


class SlotArtifactReadRequest(ArtifactReadFields):
    slot_id: Identifier


class SlotArtifactListRequest(ArtifactListFields):
    slot_id: Identifier


class SlotArtifactArchiveRequest(ArtifactArchiveFields):
    slot_id: Identifier


SlotArtifactRequest = SlotArtifactReadRequest | SlotArtifactListRequest | SlotArtifactArchiveRequest


# What ``PUT /slots/{slot_id}/archive?format=`` takes: a tar.gz extracted at ``path``, or one
# file written at ``path``.
UploadFormat = Literal["tar.gz", "file"]


# ---- workspaces made of layers (protocol 5; docs/sandbox.md, "Workspaces made of layers")

# A layer: a template ("sha256-" and the hex sha256 of its tar.gz) or a fork's snapshot.
LayerId = Annotated[str, Field(pattern=r"^(sha256-[0-9a-f]{64}|snap-[0-9a-f]{32})$")]
# Layers of one workspace, newest first. Deeper fork chains are flattened into one snapshot.
MAX_LAYERS = 32


class LayerStored(BaseModel):
    """``PUT /layers/{layer_id}``: the layer is in the store (``created`` false: it was
    already). ``bytes``: what it takes there (its tree, and a template's archive)."""

    layer_id: str
    bytes: int = 0
    entry_count: int = 0
    created: bool = False


class LayerInfo(BaseModel):
    """One layer of ``GET /layers``: ``in_use`` counts the slots whose workspace holds it;
    ``last_used`` is Unix time."""

    layer_id: str
    bytes: int
    entry_count: int
    in_use: int
    last_used: float


class LayersResponse(BaseModel):
    """``GET /layers``: the store, its budget (``layer_cache_mb``) and the workspace mode."""

    layers: list[LayerInfo]
    budget_bytes: int
    mode: Literal["overlay", "copy"]


class LayerDropped(BaseModel):
    """``DELETE /layers/{layer_id}``: ``removed`` false when it is absent, or in use (it then
    goes when the last slot using it lets it go)."""

    layer_id: str
    removed: bool = False


class SlotWorkspaceRequest(BaseModel):
    """``POST /slots/{slot_id}/workspace``: restart the slot on a workspace made of ``layers``
    (newest first; none: an empty workspace), wiping everything it held, as a reset."""

    layers: Annotated[list[LayerId], Field(max_length=MAX_LAYERS)]


class SlotForkRequest(BaseModel):
    """``POST /slots/{slot_id}/fork``: start ``targets`` (slots of this sandbox, none: only
    the snapshot, for forks that land elsewhere) on the slot's files as they are now."""

    targets: Annotated[list[Identifier], Field(max_length=4096)]


class ForkAnswer(BaseModel):
    """The fork's layers, newest first: what a slot on another sandbox starts on."""

    layers: list[str]
