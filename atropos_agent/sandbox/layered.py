"""One slot's workspace made of layers: an overlay of them, or a copy.

**overlay** mode: each layer's tree is bound (idmapped, read-only) at
``<slot root>/lower/<i>``, and an overlay of them (newest first) with the upper directory
``<slot root>/upper`` is mounted on ``<slot root>/workspace``, which bubblewrap binds at
``/workspace`` as for any slot. The slot writes into ``upper`` only: its own changes, what its
disk bound counts (``upper`` is bound read-only on ``<slot root>/changes``, which the slot
sees at ``/run/atropos-changes``, for its agent to measure). Both directories are mount
points of their own (``slot.py``), so a workspace mounted there reaches a running slot.

**copy** mode: the layers' trees are copied into the workspace, oldest first, each one's
whiteouts and opaque directories applied before it; the copy is given to the slot's uid and
recorded in a manifest, against which diffs are made, and the disk bound counts what the
workspace holds beyond what the copy took.

The slot (``slot.py``) builds and unmounts it around its agent's life and wipes its
directories; building, unmounting and reading run in worker threads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from atropos_agent.sandbox import changes, mounts
from atropos_agent.sandbox.changes import Changes, Manifest
from atropos_agent.sandbox.isolation import DiskBound, SlotPaths
from atropos_agent.sandbox.layers import Layer, LayerStore, Mode, Staged


class LayeredWorkspace:
    """``layers`` newest first, held in the store for as long as the workspace exists (at
    least one: a workspace of no layers is a plain directory, no ``LayeredWorkspace``)."""

    def __init__(
        self,
        paths: SlotPaths,
        uid: int | None,
        layers: list[Layer],
        mode: Mode,
        store: LayerStore,
        namespaces: mounts.IdmapNamespaces,
    ) -> None:
        self.paths = paths
        self.uid = uid
        self.layers = layers
        self.mode = mode
        self.store = store
        self.namespaces = namespaces
        # Copy mode: what the workspace held when it was made, and the bytes that took.
        self.manifest: Manifest = {}
        self.baseline_bytes = 0
        self.released = False
        # What ``mount`` mounted, in order: ``unmount`` takes exactly these off again (the
        # workspace and changes directories are mount points of their own below them).
        self.mounted: list[Path] = []

    @property
    def layer_ids(self) -> list[str]:
        return [layer.layer_id for layer in self.layers]

    @property
    def upper(self) -> Path:
        return self.paths.root / "upper"

    @property
    def work(self) -> Path:
        return self.paths.root / "overlay-work"

    @property
    def lower_root(self) -> Path:
        return self.paths.root / "lower"

    def lowers(self) -> list[Path]:
        return [self.lower_root / str(i) for i in range(len(self.layers))]

    def directories(self) -> list[Path]:
        """The slot's directories this workspace makes besides the workspace itself (wiped
        once it is unmounted)."""
        return [self.upper, self.work, self.lower_root]

    def disk(self) -> DiskBound:
        if self.mode == "overlay":
            return DiskBound(counts_changes=True)
        return DiskBound(baseline_bytes=self.baseline_bytes)

    def release(self) -> None:
        """Let the layers go (once, on the event loop's thread): the workspace is gone."""
        if not self.released:
            self.released = True
            self.store.release(self.layers)

    # ---- making and unmaking (worker threads)

    def build(self) -> None:
        """Make the workspace in the slot's empty workspace directory; on failure, whatever
        was mounted is unmounted again."""
        if self.mode == "overlay":
            try:
                self.mount()
            except BaseException:
                self.unmount()
                raise
        else:
            self.copy()
        if self.uid is not None:
            os.chown(self.paths.workspace, self.uid, self.uid)
        os.chmod(self.paths.workspace, 0o700)

    def mount(self) -> None:
        assert self.uid is not None  # overlay mode needs slots of their own uids
        self.upper.mkdir(mode=0o700)
        os.chown(self.upper, self.uid, self.uid)
        self.work.mkdir(mode=0o700)
        self.lower_root.mkdir(mode=0o700)
        userns = self.namespaces.fd_for(self.uid)
        for layer, lower in zip(self.layers, self.lowers(), strict=True):
            lower.mkdir()
            mounts.bind_idmapped(layer.tree, lower, userns)
            self.mounted.append(lower)
        mounts.mount_overlay(self.lowers(), self.upper, self.work, self.paths.workspace)
        self.mounted.append(self.paths.workspace)
        if self.paths.changes is not None:
            mounts.bind_readonly(self.upper, self.paths.changes)
            self.mounted.append(self.paths.changes)

    def copy(self) -> None:
        workspace = self.paths.workspace
        for layer in reversed(self.layers):
            whiteouts, opaque = layer.marks()
            for path in whiteouts:
                remove(workspace / path)
            for path in opaque:
                remove(workspace / path)
                (workspace / path).mkdir(mode=0o755)
            # -T: the tree's contents merge into the workspace, as an overlay would show them.
            run(["cp", "-aT", "--reflink=auto", str(layer.tree), str(workspace)])
        if self.uid is not None:
            run(["chown", "-hR", f"{self.uid}:{self.uid}", str(workspace)])
        self.manifest, self.baseline_bytes = changes.manifest_of(workspace)

    def unmount(self) -> None:
        """Undo ``mount`` (nothing to undo in copy mode); the directories are then plain."""
        while self.mounted:
            mounts.unmount(self.mounted[-1])
            self.mounted.pop()

    # ---- reading (worker threads; the caller holds the slot so that no call runs)

    def snapshot(self) -> Staged:
        """The slot's own changes as a new layer (overlay), or its whole workspace (copy)."""
        if self.mode == "overlay":
            return self.store.copy_in(self.upper, overlay_marks=True)
        return self.store.copy_in(self.paths.workspace, overlay_marks=False)

    def fork_layers(self, snapshot_id: str) -> list[str]:
        """The layers of a fork made from ``snapshot_id`` (a snapshot of this workspace)."""
        if self.mode == "overlay":
            return [snapshot_id, *self.layer_ids]
        return [snapshot_id]

    def changes(self, target: Path, max_bytes: int) -> Changes:
        if self.mode == "overlay":
            trees = [layer.tree for layer in self.layers]
            return changes.overlay_changes(self.upper, trees, target, max_bytes)
        return changes.manifest_changes(self.paths.workspace, self.manifest, target, max_bytes)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise OSError(f"{argv[0]} failed (exit {done.returncode}): {done.stderr.strip()}")
