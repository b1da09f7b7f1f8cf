"""Artifacts: reading, listing and archiving workspace files for the executor's artifact routes.

They run inside the slot, in order with its calls, through the same path jail as the tools.
Archives store symlinks as links and never follow them. base64, hashing, mime types and tar
are imported on first use: an idle slot should not carry them.
"""

from __future__ import annotations

import os
import stat

from .framing import OP_ARTIFACT_ARCHIVE, OP_ARTIFACT_LIST, OP_ARTIFACT_READ
from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .workspace import Workspace

    Artifact = Callable[[Workspace, int, dict[str, Any]], dict[str, Any]]

# Entries a listing or an archive holds when the request names no bound.
DEFAULT_MAX_ENTRIES = 5000


def bounded(value: Any, ceiling: int, name: str) -> int:
    """A caller's bound, never above ``ceiling`` (which is also the default)."""
    if value is None:
        return ceiling
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ToolError(f"'{name}' must be a non-negative integer")
    return min(value, ceiling)


def read(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    import base64
    import mimetypes

    encoding = req.get("encoding") or "text"
    if encoding not in ("text", "base64"):
        raise ToolError("'encoding' must be 'text' or 'base64'")
    limit = bounded(req.get("max_bytes"), max_bytes, "max_bytes")
    real = workspace.resolve(req.get("path"))
    data, size, truncated = workspace.read_bytes(real, limit)
    sha = None
    if req.get("include_sha256"):
        import hashlib

        digest = hashlib.sha256()
        with open(real, "rb", opener=nofollow_opener) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sha = digest.hexdigest()
    content = (
        base64.b64encode(data).decode() if encoding == "base64" else data.decode("utf-8", "replace")
    )
    return {
        "success": True,
        "content": content,
        "error": "",
        "encoding": encoding,
        "truncated": truncated,
        "bytes": len(data),
        "file_size": size,
        "path": workspace.relative(real),
        "mime": mimetypes.guess_type(real)[0],
        "sha256": sha,
    }


def listing(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    limit = bounded(req.get("max_entries"), DEFAULT_MAX_ENTRIES, "max_entries")
    real = workspace.resolve(req.get("path") or ".")
    if not os.path.isdir(real):
        raise ToolError(f"{workspace.relative(real)} is not a directory")
    entries: list[dict[str, Any]] = []
    truncated = False
    # Breadth first: a bounded listing shows the top levels rather than one deep corner.
    stack = [real]
    while stack and not truncated:
        top = stack.pop(0)
        try:
            with os.scandir(top) as found:
                children = sorted(found, key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            if len(entries) >= limit:
                truncated = True
                break
            info = entry.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(info.st_mode)
            entries.append(
                {
                    "path": workspace.relative(entry.path),
                    "is_dir": is_dir,
                    "size": info.st_size,
                    "mtime": info.st_mtime,
                }
            )
            if is_dir and req.get("recursive"):
                stack.append(entry.path)
    return {"success": True, "entries": entries, "truncated": truncated, "error": ""}


def archive(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    import base64
    import gzip
    import io
    import tarfile

    fmt = req.get("format") or "tar.gz"
    if fmt not in ("tar.gz", "tgz"):
        raise ToolError("'format' must be 'tar.gz' or 'tgz'")
    max_bytes = bounded(req.get("max_bytes"), max_bytes, "max_bytes")
    max_entries = bounded(req.get("max_entries"), DEFAULT_MAX_ENTRIES, "max_entries")
    too_large = f"archive exceeds max_bytes={max_bytes}; raise it or archive a subdirectory"
    real = workspace.resolve(req.get("path") or ".")
    buffer = io.BytesIO()
    count = 0
    with (
        # mtime=0: the same files give the same archive bytes.
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in walk_no_follow(real):
            info = os.lstat(path)
            if not (
                stat.S_ISREG(info.st_mode)
                or stat.S_ISDIR(info.st_mode)
                or stat.S_ISLNK(info.st_mode)
            ):
                continue
            arcname = os.path.relpath(path, real)
            if arcname == ".":
                # The archived directory itself is not an entry; a single file is one.
                if stat.S_ISDIR(info.st_mode):
                    continue
                arcname = os.path.basename(real)
            count += 1
            if count > max_entries:
                raise ToolError(
                    f"archive would hold more than {max_entries} entries; "
                    "raise max_entries or archive a subdirectory"
                )
            member = tar.gettarinfo(path, arcname)
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            if member.isreg():
                with open(path, "rb", opener=nofollow_opener) as handle:
                    tar.addfile(member, handle)
            else:
                tar.addfile(member)
            if buffer.tell() > max_bytes:
                raise ToolError(too_large)
    data = buffer.getvalue()
    if len(data) > max_bytes:
        raise ToolError(too_large)
    return {
        "success": True,
        "content": base64.b64encode(data).decode(),
        "error": "",
        "encoding": "base64",
        "format": "tar.gz",
        "bytes": len(data),
        "entry_count": count,
    }


def walk_no_follow(top: str) -> list[str]:
    """``top`` and everything below it, sorted, never descending through a symlink."""
    paths = [top]
    for current, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            paths.append(os.path.join(current, name))
    return paths


def nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


ARTIFACTS: dict[str, Artifact] = {
    OP_ARTIFACT_READ: read,
    OP_ARTIFACT_LIST: listing,
    OP_ARTIFACT_ARCHIVE: archive,
}
