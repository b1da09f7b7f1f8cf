"""The sandbox server's routes for workspaces made of layers (protocol 5): thin, over
``Workspaces`` (``workspaces.py``).

    PUT    /layers/{layer_id}         raw layer tar.gz in -> LayerStored
    GET    /layers                    -> LayersResponse
    GET    /layers/{layer_id}         -> the layer's archive (application/gzip)
    DELETE /layers/{layer_id}         -> LayerDropped
    POST   /slots/{slot_id}/workspace {layers} -> SlotState (409 {"missing": [...]})
    POST   /slots/{slot_id}/fork      {targets} -> ForkAnswer {layers}
    GET    /slots/{slot_id}/export    -> the whole workspace (application/gzip)
    GET    /slots/{slot_id}/diff      -> DiffResponse

Archives leave as files streamed from an open descriptor: a layer evicted, or a temporary
archive removed, while it is being sent is still sent whole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from atropos_agent.models import DiffResponse, Identifier
from atropos_agent.sandbox.protocol import (
    ForkAnswer,
    LayerDropped,
    LayersResponse,
    LayerStored,
    SlotForkRequest,
    SlotState,
    SlotWorkspaceRequest,
)
from atropos_agent.sandbox.server import Sandbox
from atropos_agent.sandbox.workspaces import LayersMissing, Workspaces
from atropos_agent.web import error_response

GZIP = "application/gzip"
CHUNK = 1 << 20
# PUT /layers/{layer_id} takes a raw body (web.BodyRule), read as it arrives.
LAYER_ROUTE = re.compile(r"/layers/[^/]+")
RAW_GZIP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {GZIP: {"schema": {"type": "string", "format": "binary"}}},
    }
}
GZIP_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {GZIP: {"schema": {"type": "string", "format": "binary"}}}},
}
MISSING_LAYERS: dict[int | str, dict[str, Any]] = {
    409: {"description": 'missing layers: {"error": "missing layers", "missing": [layer ids]}'}
}

router = APIRouter()


def sandbox_of(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox


def workspaces_of(request: Request) -> Workspaces:
    return sandbox_of(request).workspaces


def archive_response(path: Path, temporary: bool) -> StreamingResponse:
    """The archive at ``path``, sent from a descriptor opened now (a temporary file is
    removed at once: the descriptor keeps it until it is sent)."""
    handle = open(path, "rb")  # noqa: SIM115 - closed by the generator
    if temporary:
        path.unlink()
    size = os.fstat(handle.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with handle:
            while data := handle.read(CHUNK):
                yield data

    return StreamingResponse(chunks(), media_type=GZIP, headers={"Content-Length": str(size)})


def missing_answer(exc: LayersMissing) -> Response:
    return error_response(409, "missing layers", missing=exc.missing)


@router.put("/layers/{layer_id}", response_model=LayerStored, openapi_extra=RAW_GZIP_BODY)
async def put_layer(layer_id: str, request: Request) -> LayerStored:
    """Store a layer archive (a template's sha256 must be its id); nothing is kept of one
    refused (400) or over the caps (413)."""
    return await workspaces_of(request).put_layer(layer_id, request.stream())


@router.get("/layers", response_model=LayersResponse)
async def list_layers(request: Request) -> LayersResponse:
    return workspaces_of(request).describe()


@router.get("/layers/{layer_id}", response_class=StreamingResponse, responses=GZIP_ANSWER)
async def get_layer(layer_id: str, request: Request) -> StreamingResponse:
    """The layer's archive: a template's as it came, a snapshot's made now (404: absent)."""
    return archive_response(*await workspaces_of(request).layer_archive(layer_id))


@router.delete("/layers/{layer_id}", response_model=LayerDropped)
async def delete_layer(layer_id: str, request: Request) -> LayerDropped:
    """Remove the layer now, or when the last slot using it lets it go."""
    return workspaces_of(request).delete(layer_id)


@router.post("/slots/{slot_id}/workspace", response_model=SlotState, responses=MISSING_LAYERS)
async def slot_workspace(
    slot_id: Identifier, body: SlotWorkspaceRequest, request: Request
) -> SlotState | Response:
    """Restart the slot on a workspace made of ``layers``, wiping what it held."""
    sandbox = sandbox_of(request)
    slot = sandbox.slot(slot_id)
    try:
        await sandbox.workspaces.use_layers(slot, body.layers)
    except LayersMissing as exc:
        return missing_answer(exc)
    return slot.describe()


@router.post("/slots/{slot_id}/fork", response_model=ForkAnswer, responses=MISSING_LAYERS)
async def slot_fork(
    slot_id: Identifier, body: SlotForkRequest, request: Request
) -> ForkAnswer | Response:
    """Snapshot the slot's files once, start ``targets`` on them; the fork's layers."""
    sandbox = sandbox_of(request)
    source = sandbox.slot(slot_id)
    targets = [sandbox.slot(target) for target in body.targets]
    try:
        return ForkAnswer(layers=await sandbox.workspaces.fork(source, targets))
    except LayersMissing as exc:
        return missing_answer(exc)


@router.get("/slots/{slot_id}/export", response_class=StreamingResponse, responses=GZIP_ANSWER)
async def slot_export(slot_id: Identifier, request: Request) -> StreamingResponse:
    """The slot's whole workspace as a plain tar.gz (413 over the upload cap)."""
    sandbox = sandbox_of(request)
    path = await sandbox.workspaces.export(sandbox.slot(slot_id))
    return archive_response(path, temporary=True)


@router.get("/slots/{slot_id}/diff", response_model=DiffResponse)
async def slot_diff(slot_id: Identifier, request: Request) -> DiffResponse:
    """What changed since the slot's layers: added or changed files (base64 tar.gz) and
    deleted paths."""
    sandbox = sandbox_of(request)
    return await sandbox.workspaces.diff(sandbox.slot(slot_id))
