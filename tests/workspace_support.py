"""Archives for the workspace tests: members built one by one, hostile ones included."""

from __future__ import annotations

import io
import tarfile
from typing import Any

MTIME = 1_000_000_000
Member = tuple[tarfile.TarInfo, bytes | None]


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.size = mode, MTIME, len(data)
    return info, data


def special(name: str, kind: bytes, **fields: Any) -> Member:
    """A member of tar type ``kind`` (a directory, a link, a device, a FIFO)."""
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, MTIME
    info.mode = 0o777 if kind == tarfile.SYMTYPE else 0o755
    for key, value in fields.items():
        setattr(info, key, value)
    return info, None


def directory(name: str) -> Member:
    return special(name, tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Member:
    return special(name, tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> Member:
    return special(name, tarfile.LNKTYPE, linkname=target)


def tgz(*members: Member) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


# Each archive a workspace refuses, by what is wrong with it; each also holds a harmless file
# first, which must not be left behind either.
HOSTILE: dict[str, bytes] = {
    "absolute": tgz(file("ok.txt", b"ok"), file("/etc/evil", b"x")),
    "dot-dot": tgz(file("ok.txt", b"ok"), file("a/../../evil", b"x")),
    "outside link": tgz(file("ok.txt", b"ok"), symlink("out", "../../etc")),
    "absolute link": tgz(file("ok.txt", b"ok"), symlink("out", "/etc/passwd")),
    "link through a link": tgz(
        file("ok.txt", b"ok"), symlink("here", "."), symlink("up", "here/../..")
    ),
    "device": tgz(file("ok.txt", b"ok"), special("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)),
    "fifo": tgz(file("ok.txt", b"ok"), special("pipe", tarfile.FIFOTYPE)),
    "hard link out": tgz(file("ok.txt", b"ok"), hardlink("passwd", "/etc/passwd")),
    "hard link to a later file": tgz(hardlink("early", "late"), file("late", b"x")),
}
