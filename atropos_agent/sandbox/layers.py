"""The layer store: immutable directory trees that slots' workspaces are made of.

A layer is a template (id ``sha256-<hex of its tar.gz>``, as a trainer uploaded it) or a fork's
snapshot of a slot (id ``snap-<uuid4 hex>``). It lives at ``<data dir>/layers/<id>/tree``,
owned by the server's uid (0:0 as root), modes kept but for setuid and setgid; a template also
keeps the archive it came in (``archive.tar.gz``: what ``GET /layers/{id}`` answers, whose
sha256 is its id), and a layer in copy mode its overlay marks (``marks.json``: in overlay
mode they are whiteouts and xattrs in the tree itself).

Slots hold the layers their workspace is made of (a count per layer): a layer in use is never
removed. Unused layers are evicted least recently used first when the store is over its
budget (``layer_cache_mb``); a deleted one goes as soon as no slot uses it. A sandbox's store
starts empty: the executor ships layers where they are needed.

Bookkeeping happens on the event loop's thread; unpacking, copying and removing trees happen
in worker threads, into staging directories that only become layers by a rename.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from atropos_agent.errors import RequestRefused
from atropos_agent.sandbox import layer_archive
from atropos_agent.sandbox.layer_archive import Caps, Unpacked
from atropos_agent.sandbox.trees import copy_tree

log = logging.getLogger("atropos.sandbox")

LAYER_ID = re.compile(r"^(sha256-[0-9a-f]{64}|snap-[0-9a-f]{32})$")
Mode = Literal["overlay", "copy"]


class InvalidLayerId(RequestRefused):
    """A layer id that is neither ``sha256-<64 hex>`` nor ``snap-<32 hex>``."""


class UnknownLayer(RequestRefused):
    status_code = 404


def check_layer_id(layer_id: str) -> str:
    if not LAYER_ID.match(layer_id):
        raise InvalidLayerId(
            f"invalid layer id {layer_id!r}: a layer is 'sha256-<64 hex digits>' (a template) "
            "or 'snap-<32 hex digits>' (a snapshot)"
        )
    return layer_id


def new_snapshot_id() -> str:
    return f"snap-{uuid.uuid4().hex}"


@dataclass
class Layer:
    layer_id: str
    path: Path
    # What the layer takes in the store, counted against its budget: its files' sizes, and a
    # template's archive.
    bytes: int
    entry_count: int
    last_used: float
    # Slots whose workspace holds the layer now.
    in_use: int = 0
    # Deleted while in use: removed when the last slot lets it go.
    unwanted: bool = False

    @property
    def tree(self) -> Path:
        return self.path / "tree"

    @property
    def archive(self) -> Path:
        """The archive a template came in (absent for a snapshot)."""
        return self.path / "archive.tar.gz"

    def marks(self) -> tuple[list[str], list[str]]:
        """Whiteouts and opaque directories kept beside the tree (copy mode)."""
        marks_file = self.path / "marks.json"
        if not marks_file.exists():
            return [], []
        data = json.loads(marks_file.read_text())
        return list(data["whiteouts"]), list(data["opaque"])


@dataclass(frozen=True)
class Staged:
    """A layer unpacked or copied into the staging area, not yet in the store."""

    layer_id: str
    path: Path
    bytes: int
    entry_count: int


class LayerStore:
    def __init__(self, root: Path, budget_bytes: int, mode: Mode, caps: Caps) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.mode = mode
        self.caps = caps
        self.layers: dict[str, Layer] = {}
        self.staging = root / ".staging"
        self.trash = root / ".trash"
        self.removals: set[asyncio.Future[None]] = set()

    def prepare(self) -> None:
        """An empty store (layers of an earlier run are gone with their slots)."""
        shutil.rmtree(self.root, ignore_errors=True)
        for directory in (self.root, self.staging, self.trash):
            directory.mkdir(parents=True, mode=0o700)

    def staging_path(self, suffix: str = "") -> Path:
        return self.staging / f"{uuid.uuid4().hex}{suffix}"

    # ---- bringing layers in (worker threads)

    def unpack(self, layer_id: str, archive: Path) -> Staged:
        """Unpack ``archive`` (a file in the staging area, taken over) as layer ``layer_id``;
        raises ``ArchiveRefused`` with nothing left behind."""
        path = self.staging_path()
        path.mkdir(mode=0o700)
        try:
            unpacked = layer_archive.unpack(
                archive,
                path / "tree",
                Caps(self.caps.max_entries, min(self.caps.max_bytes, self.budget_bytes)),
                metadata_allowed=layer_id.startswith("snap-"),
            )
            self.keep_marks(path, unpacked)
            size = unpacked.bytes
            if layer_id.startswith("sha256-"):
                size += archive.stat().st_size
                archive.rename(path / "archive.tar.gz")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            archive.unlink(missing_ok=True)
        return Staged(layer_id, path, size, unpacked.entry_count)

    def keep_marks(self, path: Path, unpacked: Unpacked) -> None:
        if not (unpacked.whiteouts or unpacked.opaque):
            return
        if self.mode == "overlay":
            layer_archive.write_overlay_marks(path / "tree", unpacked.whiteouts, unpacked.opaque)
        else:
            marks = {"whiteouts": unpacked.whiteouts, "opaque": unpacked.opaque}
            (path / "marks.json").write_text(json.dumps(marks))

    def copy_in(self, source: Path, *, overlay_marks: bool) -> Staged:
        """A new snapshot layer: a copy of ``source`` (a slot's upper dir or whole workspace)."""
        layer_id = new_snapshot_id()
        path = self.staging_path()
        path.mkdir(mode=0o700)
        try:
            size, entry_count = copy_tree(source, path / "tree", overlay_marks=overlay_marks)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return Staged(layer_id, path, size, entry_count)

    # ---- bookkeeping (the event loop's thread)

    def commit(self, staged: Staged) -> tuple[Layer, bool]:
        """Put a staged layer in the store; (the layer, whether it is new). A layer that came
        in meanwhile wins and the staged copy is dropped."""
        existing = self.layers.get(staged.layer_id)
        if existing is not None:
            self.discard(staged.path)
            existing.last_used = time.time()
            return existing, False
        path = self.root / staged.layer_id
        staged.path.rename(path)
        layer = Layer(staged.layer_id, path, staged.bytes, staged.entry_count, time.time())
        self.layers[layer.layer_id] = layer
        log.info(
            "event=layer_added layer=%s bytes=%d entries=%d",
            layer.layer_id,
            layer.bytes,
            layer.entry_count,
        )
        self.evict(keep=layer.layer_id)
        return layer, True

    def get(self, layer_id: str) -> Layer:
        layer = self.layers.get(layer_id)
        if layer is None:
            raise UnknownLayer(f"this sandbox has no layer {layer_id}")
        return layer

    def missing(self, layer_ids: list[str]) -> list[str]:
        return [layer_id for layer_id in layer_ids if layer_id not in self.layers]

    def acquire(self, layer_ids: list[str]) -> list[Layer]:
        """Hold the layers for a workspace; the caller checked none is missing."""
        now = time.time()
        held = [self.layers[layer_id] for layer_id in layer_ids]
        for layer in held:
            layer.in_use += 1
            layer.last_used = now
        return held

    def release(self, layers: list[Layer]) -> None:
        now = time.time()
        for layer in layers:
            layer.in_use -= 1
            layer.last_used = now
            if layer.unwanted and layer.in_use == 0:
                self.remove(layer)
        self.evict()

    def delete(self, layer_id: str) -> bool:
        """Remove the layer now (True), or once no slot uses it (False); False when absent."""
        layer = self.layers.get(layer_id)
        if layer is None:
            return False
        if layer.in_use:
            layer.unwanted = True
            return False
        self.remove(layer)
        return True

    def evict(self, keep: str | None = None) -> None:
        """Remove unused layers, least recently used first, until the store fits its budget;
        ``keep`` (the layer just added) stays whatever the budget says."""
        total = sum(layer.bytes for layer in self.layers.values())
        unused = sorted(
            (lay for lay in self.layers.values() if not lay.in_use and lay.layer_id != keep),
            key=lambda lay: lay.last_used,
        )
        for layer in unused:
            if total <= self.budget_bytes:
                break
            total -= layer.bytes
            self.remove(layer)
            log.info("event=layer_evicted layer=%s bytes=%d", layer.layer_id, layer.bytes)

    def remove(self, layer: Layer) -> None:
        """Out of the index and out of the way at once; its files go in the background."""
        del self.layers[layer.layer_id]
        trash = self.trash / uuid.uuid4().hex
        layer.path.rename(trash)
        self.discard(trash)

    def discard(self, path: Path) -> None:
        """Remove a tree that is out of the store: in a worker thread when called on the event
        loop (a big tree takes a while), awaited by ``close``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            shutil.rmtree(path, ignore_errors=True)
            return
        removal = loop.run_in_executor(None, shutil.rmtree, path, True)
        self.removals.add(removal)
        removal.add_done_callback(self.removals.discard)

    async def close(self) -> None:
        """Wait for removals still running."""
        if self.removals:
            await asyncio.gather(*self.removals, return_exceptions=True)

    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers.values())

    def archive_of(self, layer: Layer) -> tuple[Path, bool]:
        """The layer as an archive (worker thread): (its file, whether it is a temporary one
        the caller removes after sending it)."""
        if layer.archive.exists():
            return layer.archive, False
        target = self.staging_path(".tar.gz")
        layer_archive.pack(layer.tree, target, self.caps.max_bytes, layer.marks())
        return target, True
