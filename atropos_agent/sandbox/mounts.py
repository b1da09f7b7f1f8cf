"""The sandbox server's own mount namespace, and the mounts of copy-on-write workspaces in it.

At start-up a root server leaves the host's mount namespace for one of its own
(``enter_private_namespace``, before any thread exists: ``unshare`` refuses a threaded
process) and makes every mount in it private. Whatever it mounts afterwards lives and dies with
it: nothing shows on the host, nothing is left behind by a server that is killed, and its
children (every slot's bubblewrap) inherit the mounts.

A layered workspace is an overlay whose lower layers are **idmapped** bind mounts of the layer
trees: the trees are owned by 0:0, and an idmapped mount shows them owned by the slot's host uid,
so that the slot may copy a file up and write it (overlay checks the lower file's owner).
Idmapped mounts need the new mount API (``open_tree``, ``mount_setattr``, ``move_mount``),
reached through ``syscall(2)`` since glibc has no wrappers for all of them; overlay over
idmapped lowers needs Linux 5.19.

Whether all of that works here is decided once, by ``probe``: the whole chain on a throw-away
layer, down to a write as a slot's uid through a copy-up. Where any step fails (not root, no
``CAP_SYS_ADMIN`` in a container, an old kernel) workspaces are real copies instead
(``layered.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

# unshare(2), mount(2), umount2(2)
CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
# The new mount API: the same numbers on x86_64 and aarch64 (the generic syscall table).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000
EINVAL = 22

# Overlay options that keep an upper directory self-contained: a copy of it is a layer that
# means the same on any other overlay (no metadata-only copy-ups, no redirects to lower paths,
# no index of lower inodes).
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"
USERNS_READY_TIMEOUT_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountError(OSError):
    """A mount system call failed; the message names the call and the path."""


class MountAttr(ctypes.Structure):
    """``struct mount_attr`` of ``mount_setattr(2)``."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def checked(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise MountError(errno, f"{what}: {os.strerror(errno)}")
    return result


# Why this process's mounts cannot be made private; None once they are (or before start-up).
_namespace_refused: str | None = "the server did not enter a mount namespace of its own"


def enter_private_namespace() -> None:
    """Leave the host's mount namespace for a private one, when running as root.

    Must run before any thread starts. A failure is not fatal: it is remembered, and
    ``probe`` then gives the reason and workspaces fall back to copies.
    """
    global _namespace_refused
    if os.geteuid() != 0:
        _namespace_refused = "the server does not run as root"
        return
    try:
        checked(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        checked(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    except MountError as exc:
        _namespace_refused = f"no mount namespace of its own ({exc})"
        return
    _namespace_refused = None


def namespace_refused() -> str | None:
    """Why mounts are not possible in this process (None: they are, in a private namespace)."""
    return _namespace_refused


def bind_idmapped(source: Path, target: Path, userns_fd: int) -> None:
    """Bind ``source`` read-only on ``target``, its owner 0:0 shown as the namespace's uid."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
    tree = checked(
        _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags), f"open_tree {source}"
    )
    try:
        attr = MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, 0, userns_fd)
        checked(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                tree,
                b"",
                AT_EMPTY_PATH | AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"mount_setattr (idmap) {source}",
        )
        checked(
            _libc.syscall(
                SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            ),
            f"move_mount to {target}",
        )
    finally:
        os.close(tree)


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """An overlay on ``target``: ``lowers`` newest first, writes into ``upper``."""
    options = (
        f"lowerdir={':'.join(str(lower) for lower in lowers)},upperdir={upper},"
        f"workdir={work},{OVERLAY_OPTIONS}"
    )
    flags = MS_NOSUID | MS_NODEV
    checked(
        _libc.mount(b"overlay", os.fsencode(target), b"overlay", flags, options.encode()),
        f"mount overlay on {target}",
    )


def bind_shared(path: Path) -> None:
    """Make ``path`` a mount point of its own whose later mounts propagate to the copies
    other namespaces make of it: a slot's bubblewrap (a less privileged namespace, so its copy
    is a slave) then sees a workspace mounted there while it runs."""
    checked(_libc.mount(os.fsencode(path), os.fsencode(path), None, MS_BIND, None), f"bind {path}")
    checked(_libc.mount(None, os.fsencode(path), None, MS_SHARED, None), f"share {path}")


def bind_readonly(source: Path, target: Path) -> None:
    checked(
        _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None),
        f"bind {source} on {target}",
    )
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    checked(_libc.mount(None, os.fsencode(target), None, flags, None), f"read-only {target}")


def unmount(target: Path) -> None:
    """Detach the topmost mount on ``target``; nothing mounted there is no error."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) < 0:
        errno = ctypes.get_errno()
        if errno != EINVAL:
            raise MountError(errno, f"umount {target}: {os.strerror(errno)}")


def idmap_namespace(uid: int) -> int:
    """A descriptor of a new user namespace where 0 is host ``uid`` (and gid ``uid``): what an
    idmapped mount takes to show files of 0:0 as ``uid``'s.

    A namespace needs a process to be made: a short-lived ``unshare --user`` child, whose maps
    are written from here (as root) and whose namespace is kept open after it is killed.
    """
    unshare = shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        raise MountError(2, "unshare (util-linux) is not installed")
    child = subprocess.Popen(
        [unshare, "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + USERNS_READY_TIMEOUT_S
        while os.readlink(f"/proc/{child.pid}/ns/user") == own:
            if child.poll() is not None or time.monotonic() > deadline:
                raise MountError(1, f"unshare --user did not start (exit {child.returncode})")
            time.sleep(0.0005)
        Path(f"/proc/{child.pid}/uid_map").write_text(f"0 {uid} 1\n")
        Path(f"/proc/{child.pid}/setgroups").write_text("deny")
        Path(f"/proc/{child.pid}/gid_map").write_text(f"0 {uid} 1\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


class IdmapNamespaces:
    """One idmap namespace per slot uid, made on first use and kept until ``close``."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def fd_for(self, uid: int) -> int:
        fd = self.fds.get(uid)
        if fd is None:
            fd = self.fds[uid] = idmap_namespace(uid)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def probe(scratch: Path, uid: int | None, namespaces: IdmapNamespaces) -> str | None:
    """Try the whole chain of a layered workspace in ``scratch`` (removed after); None when it
    works, else why not."""
    if _namespace_refused is not None:
        return _namespace_refused
    if uid is None:
        return "slots run as the server's own uid (the server is not root)"
    layer, lower, upper, work, merged = (
        scratch / name for name in ("layer", "lower", "upper", "work", "merged")
    )
    mounted: list[Path] = []
    try:
        for directory in (layer, lower, upper, work, merged):
            directory.mkdir(parents=True)
        (layer / "file").write_text("layer\n")
        os.chown(upper, uid, uid)
        bind_idmapped(layer, lower, namespaces.fd_for(uid))
        mounted.append(lower)
        mount_overlay([lower], upper, work, merged)
        mounted.append(merged)
        done = subprocess.run(
            ["/bin/sh", "-c", "echo slot >> file && cat file"],
            cwd=merged,
            user=uid,
            group=uid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=10,
            env={},
        )
        if done.returncode != 0 or done.stdout != "layer\nslot\n":
            return f"a slot cannot write through a copy-up: {done.stderr.strip() or done.stdout}"
        if (layer / "file").read_text() != "layer\n":
            return "a write through the overlay changed the layer itself"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        for target in reversed(mounted):
            with contextlib.suppress(OSError):
                unmount(target)
        shutil.rmtree(scratch, ignore_errors=True)
