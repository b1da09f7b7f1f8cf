"""Workspaces made of layers, across one sandbox's slots: the mode that builds them, the layer
store, starting a slot on layers, forks, diffs and exports (the ``/layers`` and
``/slots/{slot_id}/...`` routes of protocol 5).

The mode is decided once at start-up (``mounts.probe``): ``overlay`` where this host lets the
server mount copy-on-write workspaces, else ``copy``; ``ATROPOS_SANDBOX_WORKSPACE_LAYERS``
forces either (``overlay`` then refuses to start where it cannot work, with the reason).

Everything that reads a slot's files (snapshot, diff, export) holds the slot, as a call does:
no call of the slot runs meanwhile. Its background jobs may still write.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from atropos_agent.errors import ArchiveRefused, RequestRefused, SandboxStartError
from atropos_agent.models import DiffResponse
from atropos_agent.sandbox import changes, mounts
from atropos_agent.sandbox.changes import Changes
from atropos_agent.sandbox.layer_archive import Caps
from atropos_agent.sandbox.layered import LayeredWorkspace
from atropos_agent.sandbox.layers import Layer, LayerStore, Mode, Staged, check_layer_id
from atropos_agent.sandbox.protocol import (
    MAX_LAYERS,
    LayerDropped,
    LayerInfo,
    LayersResponse,
    LayerStored,
)
from atropos_agent.sandbox.settings import SandboxSettings
from atropos_agent.sandbox.slot import Slot

log = logging.getLogger("atropos.sandbox")

# A layer's body is hashed and written in pieces of this size, off the event loop.
WRITE_CHUNK = 1 << 20


class LayersMissing(RequestRefused):
    """A workspace named layers this sandbox does not hold (the executor ships them and asks
    again): 409 ``{"error": "missing layers", "missing": [...]}``."""

    status_code = 409

    def __init__(self, missing: list[str]) -> None:
        super().__init__("missing layers")
        self.missing = missing


class Workspaces:
    def __init__(self, settings: SandboxSettings, data_dir: Path) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.namespaces = mounts.IdmapNamespaces()
        self.mode: Mode = "copy"
        caps = Caps(settings.upload_max_entries, settings.upload_max_bytes)
        self.store = LayerStore(data_dir / "layers", settings.layer_cache_bytes, "copy", caps)

    # ---- life cycle

    def prepare(self, slot_uid: int | None) -> None:
        """Decide the mode (a probe with ``slot_uid``, a slot's uid) and lay out the store."""
        asked = self.settings.workspace_layers
        reason = "asked for (workspace_layers=copy)"
        if asked != "copy":
            found = mounts.probe(self.data_dir / "layers-probe", slot_uid, self.namespaces)
            if found is None:
                self.mode = "overlay"
            elif asked == "overlay":
                raise SandboxStartError(
                    f"workspace_layers=overlay, but copy-on-write workspaces do not work here: "
                    f"{found}. Run the server as root with CAP_SYS_ADMIN on Linux >= 5.19, or "
                    "set ATROPOS_SANDBOX_WORKSPACE_LAYERS=auto (or copy) to copy layers instead"
                )
            else:
                reason = found
        self.store.mode = self.mode
        self.store.prepare()
        if self.mode == "overlay":
            log.info("event=workspace_layers mode=overlay")
        else:
            log.warning("event=workspace_layers mode=copy reason=%r", reason)

    def unmount_all(self, slots: list[Slot]) -> None:
        """Undo every slot's mounts (worker thread; the slots are stopped)."""
        for slot in slots:
            slot.unmount_all()

    async def close(self) -> None:
        await self.store.close()
        self.namespaces.close()

    # ---- layers

    async def put_layer(self, layer_id: str, body: AsyncIterator[bytes]) -> LayerStored:
        """Store the layer archive ``body`` as ``layer_id``: written to a file as it arrives
        (never held whole), its sha256 checked against a template's id, unpacked, committed."""
        check_layer_id(layer_id)
        layer = self.store.layers.get(layer_id)
        if layer is not None:
            layer.last_used = time.time()
            return stored(layer, created=False)
        target = self.store.staging_path(".tar.gz")
        digest = hashlib.sha256()
        started = time.monotonic()
        try:
            with open(target, "wb") as handle:
                pending: list[bytes] = []
                size = 0
                async for chunk in body:
                    pending.append(chunk)
                    size += len(chunk)
                    if size >= WRITE_CHUNK:
                        data, pending, size = b"".join(pending), [], 0
                        await asyncio.to_thread(write_hashed, handle, digest, data)
                await asyncio.to_thread(write_hashed, handle, digest, b"".join(pending))
            if layer_id.startswith("sha256-") and digest.hexdigest() != layer_id[7:]:
                raise ArchiveRefused(
                    f"the body's sha256 is {digest.hexdigest()}, not the layer id's "
                    f"{layer_id[7:]}: a template layer is named by the sha256 of its archive"
                )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        received = time.monotonic()
        staged = await asyncio.to_thread(self.store.unpack, layer_id, target)
        layer, created = self.store.commit(staged)
        log.info(
            "event=layer_received layer=%s receive_s=%.3f unpack_s=%.3f",
            layer_id,
            received - started,
            time.monotonic() - received,
        )
        return stored(layer, created)

    def describe(self) -> LayersResponse:
        return LayersResponse(
            layers=[
                LayerInfo(
                    layer_id=layer.layer_id,
                    bytes=layer.bytes,
                    entry_count=layer.entry_count,
                    in_use=layer.in_use,
                    last_used=layer.last_used,
                )
                for layer in self.store.layers.values()
            ],
            budget_bytes=self.store.budget_bytes,
            mode=self.mode,
        )

    def delete(self, layer_id: str) -> LayerDropped:
        check_layer_id(layer_id)
        return LayerDropped(layer_id=layer_id, removed=self.store.delete(layer_id))

    async def layer_archive(self, layer_id: str) -> tuple[Path, bool]:
        """The layer as an archive: (its file, whether it is temporary: the caller removes it
        once sent). The layer is held while its archive is written."""
        check_layer_id(layer_id)
        layer = self.store.get(layer_id)
        (held,) = self.store.acquire([layer.layer_id])
        try:
            return await asyncio.to_thread(self.store.archive_of, held)
        finally:
            self.store.release([held])

    # ---- slots

    async def use_layers(self, slot: Slot, layer_ids: list[str]) -> None:
        """Restart ``slot`` on a workspace of ``layer_ids`` (none: an empty one), as a reset
        does; ``LayersMissing`` (nothing changed) when the store lacks any of them."""
        missing = self.store.missing(layer_ids)
        if missing:
            raise LayersMissing(missing)
        if not layer_ids:
            await slot.use_workspace(None)
            return
        held = self.store.acquire(layer_ids)
        await slot.use_workspace(
            LayeredWorkspace(slot.paths, slot.uid, held, self.mode, self.store, self.namespaces)
        )

    async def fork(self, source: Slot, targets: list[Slot]) -> list[str]:
        """Snapshot ``source`` once and start each of ``targets`` on it; the fork's layers."""
        if source in targets:
            raise RequestRefused(f"{source.slot_id} cannot be a target of its own fork")
        if len(set(targets)) != len(targets):
            raise RequestRefused("a fork's targets must be distinct slots")
        async with source.lock:
            layered = source.layered
            flatten = layered is None or len(layered.layers) >= MAX_LAYERS
            staged = await asyncio.to_thread(self.snapshot, source, flatten)
            snapshot, _ = self.store.commit(staged)
            if flatten or layered is None:
                layer_ids = [snapshot.layer_id]
            else:
                layer_ids = layered.fork_layers(snapshot.layer_id)
            # Held until the targets hold them: the source may be reset meanwhile.
            held = self.store.acquire(layer_ids)
        try:
            started = await asyncio.gather(
                *(self.use_layers(target, layer_ids) for target in targets),
                return_exceptions=True,
            )
        finally:
            self.store.release(held)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        log.info(
            "event=slot_forked slot=%s targets=%d layers=%d snapshot_bytes=%d",
            source.slot_id,
            len(targets),
            len(layer_ids),
            snapshot.bytes,
        )
        return layer_ids

    def snapshot(self, slot: Slot, flatten: bool) -> Staged:
        """A new layer of the slot's files (worker thread, the slot held): its own changes, or
        (``flatten``) its whole workspace."""
        if flatten or slot.layered is None:
            return self.store.copy_in(slot.paths.workspace, overlay_marks=False)
        return slot.layered.snapshot()

    async def diff(self, slot: Slot) -> DiffResponse:
        """What changed in the slot's workspace since its layers (since empty without any)."""
        target = self.store.staging_path(".diff.tar.gz")
        try:
            async with slot.lock:
                found = await asyncio.to_thread(self.changes_of, slot, target)
            content = await asyncio.to_thread(target.read_bytes)
        finally:
            target.unlink(missing_ok=True)
        return DiffResponse(
            success=True,
            content=base64.b64encode(content).decode(),
            deleted=found.deleted,
            changed=found.changed,
            bytes=found.bytes,
            entry_count=len(found.changed),
        )

    def changes_of(self, slot: Slot, target: Path) -> Changes:
        max_bytes = self.settings.upload_max_bytes
        if slot.layered is None:
            return changes.manifest_changes(slot.paths.workspace, {}, target, max_bytes)
        return slot.layered.changes(target, max_bytes)

    async def export(self, slot: Slot) -> Path:
        """The slot's whole workspace as a plain tar.gz: a temporary file the caller removes."""
        target = self.store.staging_path(".export.tar.gz")
        async with slot.lock:
            await asyncio.to_thread(
                changes.export, slot.paths.workspace, target, self.settings.upload_max_bytes
            )
        return target


def write_hashed(handle: BinaryIO, digest: Any, data: bytes) -> None:
    digest.update(data)
    handle.write(data)


def stored(layer: Layer, created: bool) -> LayerStored:
    return LayerStored(
        layer_id=layer.layer_id, bytes=layer.bytes, entry_count=layer.entry_count, created=created
    )
