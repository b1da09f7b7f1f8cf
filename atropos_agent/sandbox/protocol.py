"""Payloads of the sandbox server (the hop between the executor and each container).

Version 1 is the old containers' protocol; version 2 keeps its shapes and adds fields
(``metadata.slot_id``, ``/health`` details, ``GET /slots`` details). See docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from atropos_agent.models import ArtifactArchiveFields, ArtifactListFields, ArtifactReadFields

PROTOCOL_VERSION = 2


class BatchItem(BaseModel):
    slot_id: str
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)
    execution_id: str | None = None
    timeout: float | None = Field(default=None, gt=0)


class BatchResult(BaseModel):
    success: bool
    output: str = ""
    error: str = ""
    execution_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SlotRequest(BaseModel):
    slot_id: str


class SlotArtifactReadRequest(ArtifactReadFields):
    slot_id: str


class SlotArtifactListRequest(ArtifactListFields):
    slot_id: str


class SlotArtifactArchiveRequest(ArtifactArchiveFields):
    slot_id: str


SlotArtifactRequest = SlotArtifactReadRequest | SlotArtifactListRequest | SlotArtifactArchiveRequest
