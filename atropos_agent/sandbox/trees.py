"""Reading a directory tree that a slot may change at the same time, as root, following no link.

The server reads slots' files for snapshots, diffs and exports. It runs as root and the slot's
processes (background jobs) may be running: a path checked and then opened could by then be a
symlink to ``/etc``. So every entry is reached from its parent directory's descriptor, every
open refuses a symlink (``O_NOFOLLOW``), and a directory swapped for a link between listing
and opening is skipped. What a concurrent writer changes mid-read may be seen half-written; it
never leads the server outside the tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from atropos_agent.errors import TooLarge

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Deeper trees are refused: each level holds a descriptor open during the walk.
MAX_DEPTH = 256
OPAQUE_XATTR = "trusted.overlay.opaque"
# ioctl(2) request: the generation of a file's inode (_IOR('v', 1, long)).
FS_IOC_GETVERSION = 0x80087601
# Modes a copy keeps: no setuid or setgid bits ever enter or leave a layer.
KEPT_MODE = 0o1777
COPY_CHUNK = 1 << 24


class TreeError(Exception):
    """A tree could not be read or copied; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One entry below the walked root: its '/'-separated relative path, its ``lstat``, and
    where it is (its name in the directory ``dir_fd``, open while the walk is at it)."""

    path: str
    info: os.stat_result
    dir_fd: int
    name: str

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.info.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.info.st_mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.info.st_mode)

    @property
    def is_whiteout(self) -> bool:
        """An overlay whiteout: a character device 0/0."""
        return stat.S_ISCHR(self.info.st_mode) and self.info.st_rdev == 0

    def open_file(self) -> BinaryIO | None:
        """The regular file, opened for reading; None when it is not one (any more)."""
        try:
            fd = os.open(self.name, OPEN_FILE, dir_fd=self.dir_fd)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def link_target(self) -> str | None:
        try:
            return os.readlink(self.name, dir_fd=self.dir_fd)
        except OSError:
            return None

    def generation(self) -> int:
        """The inode's generation (``FS_IOC_GETVERSION``): new whenever an inode number is
        given out again. 0 where the file system does not say."""
        try:
            fd = os.open(self.name, OPEN_DIR if self.is_dir else OPEN_FILE, dir_fd=self.dir_fd)
        except OSError:
            return 0
        try:
            answer = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
            return int.from_bytes(answer, sys.byteorder)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def is_opaque(self) -> bool:
        """A directory an overlay marked opaque: it hides the lower layers' one."""
        try:
            fd = os.open(self.name, OPEN_DIR, dir_fd=self.dir_fd)
        except OSError:
            return False
        try:
            return os.getxattr(fd, OPAQUE_XATTR) == b"y"
        except OSError:
            return False
        finally:
            os.close(fd)


def walk(root: Path) -> Iterator[Entry]:
    """Every entry below ``root`` (not ``root`` itself), each directory before what it holds,
    names in sorted order; a symlink is reported, never followed."""
    top = os.open(root, OPEN_DIR)
    # Depth-first, with the descriptors of the directories being walked.
    stack: list[tuple[int, str, Iterator[str]]] = [(top, "", iter(sorted(os.listdir(top))))]
    try:
        while stack:
            dir_fd, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(dir_fd)
                stack.pop()
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            entry = Entry(prefix + name, info, dir_fd, name)
            yield entry
            if not entry.is_dir:
                continue
            if len(stack) >= MAX_DEPTH:
                raise TreeError(f"{entry.path}: directories nest deeper than {MAX_DEPTH} levels")
            try:
                child = os.open(name, OPEN_DIR, dir_fd=dir_fd)
            except OSError:
                continue  # removed, or swapped for a link, since it was listed
            if not os.path.samestat(info, os.fstat(child)):
                os.close(child)
                continue
            try:
                listing = iter(sorted(os.listdir(child)))
            except OSError:
                os.close(child)
                continue
            stack.append((child, entry.path + "/", listing))
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)


def copy_data(source: BinaryIO, target_fd: int) -> int:
    """Copy an open file into ``target_fd`` in the kernel where it can; the bytes copied."""
    source_fd = source.fileno()
    copied = 0
    try:
        while True:
            count = os.copy_file_range(source_fd, target_fd, COPY_CHUNK)
            if count == 0:
                return copied
            copied += count
    except OSError:
        pass  # a file system without it: copy through user space
    os.lseek(source_fd, copied, os.SEEK_SET)
    while chunk := os.read(source_fd, 1 << 20):
        os.write(target_fd, chunk)
        copied += len(chunk)
    return copied


def copy_tree(source: Path, target: Path, *, overlay_marks: bool) -> tuple[int, int]:
    """Copy the tree ``source`` into the new directory ``target``, owned by this process's uid
    (root: 0:0), without setuid or setgid bits. With ``overlay_marks``, overlay whiteouts and
    opaque directories are copied as such (a layer made from an overlay's upper directory);
    other devices, FIFOs and sockets are left out. Returns (bytes of the files, entries)."""
    target.mkdir(mode=0o700)
    directories: list[tuple[Path, os.stat_result]] = []
    copied = entries = 0
    for entry in walk(source):
        entries += 1
        path = target / entry.path
        if entry.is_dir:
            path.mkdir(mode=0o700)
            if overlay_marks and entry.is_opaque():
                os.setxattr(path, OPAQUE_XATTR, b"y")
            directories.append((path, entry.info))
        elif entry.is_file:
            handle = entry.open_file()
            if handle is None:
                continue
            with handle:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    copied += copy_data(handle, fd)
                    os.fchmod(fd, entry.info.st_mode & 0o777)
                finally:
                    os.close(fd)
            os.utime(path, ns=(entry.info.st_atime_ns, entry.info.st_mtime_ns))
        elif entry.is_link:
            link = entry.link_target()
            if link is not None:
                os.symlink(link, path)
        elif overlay_marks and entry.is_whiteout:
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
    # Modes last: a read-only directory must still take what goes into it.
    for path, info in reversed(directories):
        os.chmod(path, info.st_mode & KEPT_MODE)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    return copied, entries


class PaddedReader:
    """A file's first ``size`` bytes, padded with zeros when it shrank since it was measured
    (a tar member's size is written before its data)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.left = size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count < 0 else min(count, self.left)
        data = self.handle.read(count)
        data += b"\0" * (count - len(data))
        self.left -= len(data)
        return data


class TarWriter:
    """A tar.gz written from tree entries, every member owned by 0:0, bounded in size."""

    def __init__(self, target: Path, max_bytes: int, compresslevel: int = 1) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.raw = open(target, "wb")  # noqa: SIM115 - closed by close()
        self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=self.raw, mode="w:gz", compresslevel=compresslevel
        )
        self.entries = 0

    def member(self, name: str, info: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.type = kind
        member.mode = info.st_mode & 0o777
        member.mtime = int(info.st_mtime)
        return member

    def add(self, entry: Entry, name: str | None = None) -> bool:
        """Add ``entry`` (a directory, regular file or symlink) as ``name``; False when it is
        none of these (any more)."""
        name = name or entry.path
        if entry.is_dir:
            self.write(self.member(name, entry.info, tarfile.DIRTYPE))
        elif entry.is_file:
            handle = entry.open_file()
            if handle is None:
                return False
            with handle:
                member = self.member(name, entry.info, tarfile.REGTYPE)
                member.size = os.fstat(handle.fileno()).st_size
                self.write(member, PaddedReader(handle, member.size))
        elif entry.is_link:
            link = entry.link_target()
            if link is None:
                return False
            member = self.member(name, entry.info, tarfile.SYMTYPE)
            member.linkname = link
            self.write(member)
        else:
            return False
        return True

    def add_bytes(self, name: str, data: bytes) -> None:
        import io

        member = tarfile.TarInfo(name)
        member.size = len(data)
        member.mode = 0o644
        self.write(member, io.BytesIO(data))

    def write(self, member: tarfile.TarInfo, data: object = None) -> None:
        self.tar.addfile(member, data)  # type: ignore[arg-type]
        self.entries += 1
        if self.raw.tell() > self.max_bytes:
            raise TooLarge(
                f"the archive would be larger than {self.max_bytes} bytes (the upload cap, "
                "upload_max_mb)"
            )

    def close(self) -> int:
        """Finish the archive; its size in bytes."""
        self.tar.close()
        self.raw.close()
        return self.target.stat().st_size

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tar.close()
        self.raw.close()
        with contextlib.suppress(FileNotFoundError):
            self.target.unlink()
