"""Artifacts: reading, listing and archiving workspace files for the executor's artifact routes.

They run inside the slot, in order with its calls, through the same path jail as the tools.
Answers follow the old service: ``mime`` from a fixed suffix table, ``sha256`` of the bytes
returned, a file listed as itself, archives of files only (symlinks stored as links, never
followed) named from the workspace root. base64, hashing, gzip and tar are imported on first
use: an idle slot should not carry them.
"""

from __future__ import annotations

import os
import stat

from .framing import OP_ARTIFACT_ARCHIVE, OP_ARTIFACT_LIST, OP_ARTIFACT_READ
from .results import ToolError
from .workspace import read_at_most

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
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


# The old service's suffix table, exactly; anything else is application/octet-stream.
MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".txt": "text/plain",
    ".log": "text/plain",
    ".json": "application/json",
    ".xml": "application/xml",
    ".html": "text/html",
    ".md": "text/markdown",
    ".tgz": "application/gzip",
}
GZIP_MIME = "application/gzip"
DEFAULT_MIME = "application/octet-stream"
# An archive over max_bytes is still built to the end to tell its real size, but not beyond
# these: the bytes of archive counted, and the bytes of files read into it. The archive
# itself is kept in memory only while it fits max_bytes.
ARCHIVE_MEASURE_CEILING = 64 * 1024 * 1024
ARCHIVE_INPUT_CEILING = 256 * 1024 * 1024


def mime_type(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.endswith(".tar.gz"):
        return GZIP_MIME
    return MIME_TYPES.get(os.path.splitext(name)[1], DEFAULT_MIME)


def read(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    """A file's first ``max_bytes``; ``sha256`` of those bytes, ``file_sha256`` of the file."""
    import base64

    encoding = req.get("encoding") or "text"
    if encoding not in ("text", "base64"):
        raise ToolError("'encoding' must be 'text' or 'base64'")
    limit = bounded(req.get("max_bytes"), max_bytes, "max_bytes")
    real = workspace.resolve(req.get("path"))
    name = workspace.relative(real)
    sha = file_sha = None
    with workspace.open_file(real) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = read_at_most(handle, limit + 1, name)
        truncated = len(data) > limit
        if req.get("include_sha256"):
            import hashlib

            sha = hashlib.sha256(data[:limit]).hexdigest()
            file_sha = sha
            if truncated:
                # The same open file, read on to its end: no second open to race with.
                whole = hashlib.sha256(data)
                while block := read_at_most(handle, 1 << 20, name):
                    whole.update(block)
                file_sha = whole.hexdigest()
    data = data[:limit]
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
        "path": name,
        "mime": mime_type(real),
        "sha256": sha,
        "file_sha256": file_sha,
    }


def entry_of(workspace: Workspace, path: str, info: os.stat_result) -> dict[str, Any]:
    return {
        "path": workspace.relative(path),
        "is_dir": stat.S_ISDIR(info.st_mode),
        "size": info.st_size,
        "mtime": info.st_mtime,
    }


def listing(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    """A directory's entries (breadth first when recursive); a file lists as itself."""
    limit = bounded(req.get("max_entries"), DEFAULT_MAX_ENTRIES, "max_entries")
    real = workspace.resolve(req.get("path") or ".")
    try:
        top = os.lstat(real)
    except OSError:
        raise ToolError(f"no such file or directory: {workspace.relative(real)}") from None
    if not stat.S_ISDIR(top.st_mode):
        itself = [entry_of(workspace, real, top)][:limit]
        return {"success": True, "entries": itself, "truncated": limit < 1, "error": ""}
    entries: list[dict[str, Any]] = []
    truncated = False
    # Breadth first: a bounded listing shows the top levels rather than one deep corner.
    queue = [real]
    while queue and not truncated:
        current = queue.pop(0)
        try:
            with os.scandir(current) as found:
                children = sorted(found, key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            if len(entries) >= limit:
                truncated = True
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the directory was read
            entries.append(entry_of(workspace, entry.path, info))
            if stat.S_ISDIR(info.st_mode) and req.get("recursive"):
                queue.append(entry.path)
    return {"success": True, "entries": entries, "truncated": truncated, "error": ""}


class SizedSink:
    """Where the archive is written: kept while it fits ``keep`` bytes, counted always."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.size = 0
        self.data = bytearray()
        self.overflowed = False

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if not self.overflowed:
            if self.size > self.keep:
                self.overflowed = True
                self.data = bytearray()
            else:
                self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def archive(workspace: Workspace, max_bytes: int, req: dict[str, Any]) -> dict[str, Any]:
    """A tar.gz of the files below a path (or of one file), named from the workspace root.

    Files only: directories are not entries; symlinks are stored as links, never followed.
    More files than ``max_entries``: the first ones in sorted path order, ``truncated``.
    Larger than ``max_bytes``: ``success`` false with the archive's size in ``bytes``.
    """
    import base64
    import gzip
    import tarfile

    fmt = req.get("format") or "tar.gz"
    if fmt not in ("tar.gz", "tgz"):
        raise ToolError("'format' must be 'tar.gz' or 'tgz'")
    max_bytes = bounded(req.get("max_bytes"), max_bytes, "max_bytes")
    max_entries = bounded(req.get("max_entries"), DEFAULT_MAX_ENTRIES, "max_entries")
    real = workspace.resolve(req.get("path") or ".")
    if not os.path.lexists(real):
        raise ToolError(f"no such file or directory: {workspace.relative(real)}")
    sink: Any = SizedSink(max_bytes)  # file-like enough for GzipFile
    count = read_in = 0
    truncated = measured_all = False
    with (
        # mtime=0: the same files give the same archive bytes. Level 6 (gzip's own default)
        # rather than 9: several times faster, and an archive over max_bytes is compressed to
        # its end to be measured.
        gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in walk_files(real):
            if count >= max_entries:
                truncated = True
                break
            if sink.overflowed and (
                sink.size > ARCHIVE_MEASURE_CEILING or read_in > ARCHIVE_INPUT_CEILING
            ):
                break
            name = workspace.relative(path)
            try:
                member = tar.gettarinfo(path, name)
                if member.isreg():
                    with open(path, "rb", opener=nofollow_opener) as handle:
                        member.size = os.fstat(handle.fileno()).st_size
                        member.uid = member.gid = 0
                        member.uname = member.gname = ""
                        tar.addfile(member, handle)
                    read_in += member.size
                else:
                    member.uid = member.gid = 0
                    member.uname = member.gname = ""
                    tar.addfile(member)
            except FileNotFoundError:
                continue  # removed since the walk saw it
            except OSError as exc:
                raise ToolError(f"cannot archive {name}: {exc.strerror or exc}") from None
            count += 1
        else:
            measured_all = True
    if sink.overflowed:
        size = f"{sink.size} bytes" if measured_all or truncated else f"more than {sink.size} bytes"
        return {
            "success": False,
            "content": "",
            "error": (
                f"archive of {size} exceeds max_bytes={max_bytes}; raise it (up to the "
                "sandbox's file limit) or archive a subdirectory"
            ),
            "bytes": sink.size,
            "entry_count": count,
        }
    return {
        "success": True,
        "content": base64.b64encode(sink.data).decode(),
        "error": "",
        "encoding": "base64",
        "format": "tar.gz",
        "bytes": sink.size,
        "entry_count": count,
        "truncated": truncated,
    }


def walk_files(top: str) -> Iterator[str]:
    """Regular files and symlinks at or below ``top``, in sorted path order (depth first,
    names sorted), never descending through a symlink; other kinds of file are left out."""
    pending = [top]
    while pending:
        path = pending.pop()
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            try:
                names = os.listdir(path)
            except OSError:
                continue
            # Reversed onto the stack: the smallest name is taken first.
            pending.extend(os.path.join(path, name) for name in sorted(names, reverse=True))
        elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
            yield path


def nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


ARTIFACTS: dict[str, Artifact] = {
    OP_ARTIFACT_READ: read,
    OP_ARTIFACT_LIST: listing,
    OP_ARTIFACT_ARCHIVE: archive,
}
