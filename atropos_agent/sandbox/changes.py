"""What a slot changed in its workspace since its layers: the files added or changed (as a
tar.gz) and the paths deleted. What a trainer scores, without the template's bulk.

Two ways to know, one per workspace mode:

- **overlay**: the overlay's upper directory *is* the change. A file there was added or
  changed; a whiteout (a character device 0/0) is a deletion; an opaque directory replaced the
  layers' one (its path is deleted, then all it holds is added); a directory that the layers
  have too is only a container of changes, reported when its mode changed.
- **copy**: a manifest of the workspace taken when it was made (path -> kind, mode, size,
  mtime, inode, link) compared with the workspace now. A directory whose inode (or the
  inode's generation) changed was replaced (as an opaque one), so both modes report the same
  shape.

Applying a diff: remove every path in ``deleted`` (recursively), then unpack the archive.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from atropos_agent.sandbox.trees import OPAQUE_XATTR, Entry, TarWriter, walk


class Recorded(NamedTuple):
    """One workspace entry as a manifest records it."""

    kind: int  # stat.S_IFMT of its mode
    mode: int
    size: int
    mtime_ns: int
    # A directory's inode and the inode's generation: a directory removed and made again
    # often gets the same inode number back, never the same generation (0: not known).
    inode: int
    generation: int
    link: str | None


Manifest = dict[str, Recorded]


def recorded(entry: Entry) -> Recorded:
    info = entry.info
    link = entry.link_target() if entry.is_link else None
    return Recorded(
        stat.S_IFMT(info.st_mode),
        stat.S_IMODE(info.st_mode),
        info.st_size if not entry.is_dir else 0,
        info.st_mtime_ns if not entry.is_dir else 0,
        info.st_ino,
        entry.generation() if entry.is_dir else 0,
        link,
    )


def manifest_of(workspace: Path) -> tuple[Manifest, int]:
    """The manifest of a workspace, and the bytes it takes on disk."""
    manifest: Manifest = {}
    used = 0
    for entry in walk(workspace):
        manifest[entry.path] = recorded(entry)
        used += entry.info.st_blocks * 512
    return manifest, used


@dataclass
class Changes:
    """A diff: its archive (a file the caller removes), what is in it, what was deleted."""

    archive: Path
    bytes: int = 0
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def under(path: str, prefixes: set[str]) -> bool:
    """Whether ``path`` lies below one of ``prefixes``."""
    parent = path.rpartition("/")[0]
    while parent:
        if parent in prefixes:
            return True
        parent = parent.rpartition("/")[0]
    return False


class LowerKind(NamedTuple):
    kind: int
    mode: int


def lower_lookup(trees: list[Path], path: str) -> LowerKind | None:
    """What the layers ``trees`` (newest first) show at ``path``, as an overlay would merge
    them: whiteouts hide, opaque directories and non-directories end the merge below them."""
    parts = path.split("/")
    candidates = list(trees)
    for depth, part in enumerate(parts):
        found: LowerKind | None = None
        below: list[Path] = []
        for directory in candidates:
            try:
                info = os.lstat(directory / part)
            except OSError:
                continue
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                break  # a whiteout: nothing of the older layers shows
            if stat.S_ISDIR(info.st_mode):
                if found is None:
                    found = LowerKind(stat.S_IFDIR, stat.S_IMODE(info.st_mode))
                below.append(directory / part)
                if is_opaque(directory / part):
                    break
                continue
            if found is None:
                found = LowerKind(stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
            break  # a non-directory hides what older layers have at the same name
        if found is None:
            return None
        if depth == len(parts) - 1:
            return found
        if found.kind != stat.S_IFDIR:
            return None
        candidates = below
    return None


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def overlay_changes(upper: Path, lower_trees: list[Path], target: Path, max_bytes: int) -> Changes:
    """The diff of an overlay workspace from its upper directory (see the module's text)."""
    changes = Changes(target)
    writer = TarWriter(target, max_bytes)
    whole: set[str] = set()  # directories new or replaced: everything below them is added
    try:
        for entry in walk(upper):
            if under(entry.path, whole):
                if not entry.is_whiteout and writer.add(entry):
                    changes.changed.append(entry.path)
                    if entry.is_dir:
                        whole.add(entry.path)
                continue
            lower = lower_lookup(lower_trees, entry.path)
            if entry.is_whiteout:
                if lower is not None:
                    changes.deleted.append(entry.path)
                continue
            if entry.is_dir:
                if lower is None or lower.kind != stat.S_IFDIR or entry.is_opaque():
                    if lower is not None:
                        changes.deleted.append(entry.path)
                    whole.add(entry.path)
                elif lower.mode == stat.S_IMODE(entry.info.st_mode):
                    continue  # only a container of changes below it
            elif lower is not None and lower.kind == stat.S_IFDIR:
                changes.deleted.append(entry.path)  # a file or link took a directory's place
            if writer.add(entry):
                changes.changed.append(entry.path)
        changes.bytes = writer.close()
    except BaseException:
        writer.discard()
        raise
    return changes


def manifest_changes(workspace: Path, manifest: Manifest, target: Path, max_bytes: int) -> Changes:
    """The diff of a copied workspace against its manifest (an empty manifest: everything is
    added)."""
    changes = Changes(target)
    writer = TarWriter(target, max_bytes)
    whole: set[str] = set()
    seen: set[str] = set()
    try:
        for entry in walk(workspace):
            seen.add(entry.path)
            old = manifest.get(entry.path)
            if old is not None and not under(entry.path, whole):
                now = recorded(entry)
                replaced = (old.inode, old.generation) != (now.inode, now.generation)
                if old.kind != now.kind or (entry.is_dir and replaced):
                    changes.deleted.append(entry.path)  # replaced: the old one goes first
                    if entry.is_dir:
                        whole.add(entry.path)
                elif old == now:
                    continue  # a directory records no size or time: only its mode counts
            elif entry.is_dir:
                whole.add(entry.path)
            if writer.add(entry):
                changes.changed.append(entry.path)
        gone = set(changes.deleted)
        for path in sorted(set(manifest) - seen):
            if not under(path, gone):
                changes.deleted.append(path)
                gone.add(path)
        changes.bytes = writer.close()
    except BaseException:
        writer.discard()
        raise
    return changes


def export(workspace: Path, target: Path, max_bytes: int) -> tuple[int, int]:
    """The whole workspace as a plain tar.gz at ``target``: (its bytes, its entries)."""
    writer = TarWriter(target, max_bytes)
    try:
        for entry in walk(workspace):
            writer.add(entry)
        return writer.close(), writer.entries
    except BaseException:
        writer.discard()
        raise
