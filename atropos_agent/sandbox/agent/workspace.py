"""The path jail: tool paths mapped into the workspace, disk use, and bounded reads and writes.

A tool path is relative to the workspace (``/workspace/...`` is accepted too). Any other
absolute path, a ``..`` that leaves the workspace, and a symlink that leads out of it are
refused; files are opened with ``O_NOFOLLOW`` so a symlink swapped in after the check is not
followed either.
"""

from __future__ import annotations

import os
import stat

from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO

MIB = 1024 * 1024
# The workspace's name inside a slot, as commands and callers see it.
WORKSPACE_IN_SLOT = "/workspace"


class Workspace:
    """One slot's files: ``root`` (the workspace) and ``scratch`` (its /tmp), both real paths.

    ``disk_limit`` bounds both together, in bytes of allocated blocks. On a workspace made of
    layers it counts only the slot's own changes: those in ``disk_root`` (an overlay's upper
    directory, at the same relative paths as in the workspace) instead of the workspace, or
    what the workspace holds beyond ``disk_baseline`` (a copy of the layers).
    """

    def __init__(
        self,
        root: str,
        scratch: list[str],
        disk_limit: int,
        disk_root: str | None = None,
        disk_baseline: int = 0,
    ) -> None:
        self.root = root
        self.scratch = scratch
        self.disk_limit = disk_limit
        self.disk_root = disk_root or root
        self.disk_baseline = disk_baseline

    def resolve(self, path: Any, *, for_write: bool = False) -> str:
        """Map a tool path to a real path inside the workspace, refusing every escape.

        ``for_write`` creates the parent directories (and checks them again afterwards: one
        of them may be a symlink created meanwhile).
        """
        if not isinstance(path, str) or not path:
            raise ToolError("'path' must be a non-empty string")
        if "\x00" in path:
            raise ToolError("'path' must not contain NUL bytes")
        if path == WORKSPACE_IN_SLOT or path.startswith(WORKSPACE_IN_SLOT + "/"):
            path = path[len(WORKSPACE_IN_SLOT) :].lstrip("/") or "."
        elif os.path.isabs(path):
            raise ToolError(f"absolute path {path!r} is outside /workspace; use a relative path")
        joined = os.path.normpath(os.path.join(self.root, path))
        if not self.inside(joined):
            raise ToolError(f"path {path!r} escapes the workspace")
        real: str = os.path.realpath(joined)
        if not self.inside(real):
            raise ToolError(f"path {path!r} leads out of the workspace through a symlink")
        if for_write:
            if real == self.root:
                raise ToolError(f"{WORKSPACE_IN_SLOT} is a directory")
            parent = os.path.dirname(real)
            os.makedirs(parent, exist_ok=True)
            if not self.inside(os.path.realpath(parent)):
                raise ToolError(f"path {path!r} leads out of the workspace through a symlink")
        return real

    def enter(self, request: dict[str, Any]) -> dict[str, Any]:
        """The server made the workspace anew under this agent (a fresh slot started on
        layers): enter it again (commands start where the agent is), count the disk bound as
        ``request`` says, and answer where the agent now is (device and inode)."""
        os.chdir(self.root)
        self.disk_root = os.path.realpath(request.get("disk_root") or self.root)
        self.disk_baseline = int(request.get("disk_baseline_bytes", 0))
        here = os.stat(".")
        return {"success": True, "device": here.st_dev, "inode": here.st_ino}

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def relative(self, real: str) -> str:
        """How a caller names ``real``: relative to the workspace."""
        return os.path.relpath(real, self.root)

    def display(self, real: str) -> str:
        """How an error names ``real``: relative, or ``/workspace`` for the workspace itself."""
        return WORKSPACE_IN_SLOT if real == self.root else self.relative(real)

    def disk_usage(self) -> int:
        """Bytes allocated under the measured directory and scratch, less the baseline
        (symlinks are not followed)."""
        used = -self.disk_baseline
        stack = [self.disk_root, *self.scratch]
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as entries:
                    for entry in entries:
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        used += info.st_blocks * 512
                        if stat.S_ISDIR(info.st_mode):
                            stack.append(entry.path)
            except OSError:
                continue
        return max(used, 0)

    def open_file(self, real: str) -> BinaryIO:
        """A regular file opened for reading; a clear error for a directory or anything else.

        The one place tools and artifacts open a file to read it: no symlink is followed,
        and a FIFO planted in the workspace does not hang the agent on open.
        """
        name = self.display(real)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ToolError(f"no such file: {name}") from None
        except IsADirectoryError:
            raise ToolError(f"{name} is a directory") from None
        except OSError as exc:
            raise ToolError(f"cannot open {name}: {exc.strerror}") from None
        # Checked on the descriptor, before ``fdopen``, which refuses a directory itself.
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fdopen(fd, "rb")
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ToolError(f"{name} is a directory")
        raise ToolError(f"{name} is not a regular file")

    def read_bytes(self, real: str, limit: int) -> tuple[bytes, int, bool]:
        """At most ``limit`` bytes of a regular file: (data, file size, truncated)."""
        with self.open_file(real) as handle:
            size = os.fstat(handle.fileno()).st_size
            data = read_at_most(handle, limit + 1, self.relative(real))
        return data[:limit], size, len(data) > limit

    def write_bytes(self, real: str, data: bytes) -> None:
        """Replace a file's content, refused when it would take the slot over its disk bound."""
        if os.path.isdir(real):
            raise ToolError(f"{self.display(real)} is a directory")
        used = self.disk_usage()
        # What the file takes now where the bound counts (an overlay's upper holds a layer's
        # file only once it was written).
        counted = os.path.join(self.disk_root, self.relative(real))
        existing = os.lstat(counted).st_size if os.path.lexists(counted) else 0
        if used - existing + len(data) > self.disk_limit:
            raise ToolError(
                f"writing {len(data)} bytes would exceed the workspace disk limit of "
                f"{self.disk_limit // MIB} MiB; delete files to continue"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(real, flags, 0o644)
        except OSError as exc:
            raise ToolError(f"cannot write {self.relative(real)}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as exc:  # the file size limit, a full disk
            raise ToolError(f"cannot write {self.relative(real)}: {exc.strerror}") from None


def read_at_most(handle: BinaryIO, size: int, name: str) -> bytes:
    """Up to ``size`` bytes of an open file; a read error becomes a clear tool error."""
    try:
        return handle.read(size)
    except OSError as exc:
        raise ToolError(f"cannot read {name}: {exc.strerror}") from None
