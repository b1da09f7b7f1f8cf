"""Archives on the trainer's side: a folder packed for an upload, a diff unpacked (checked)."""

from __future__ import annotations

import base64
import io
import os
import tarfile
from pathlib import Path

from atropos_agent.errors import ArchiveRefused
from atropos_agent.models import DiffResponse


def archive_of_dir(local_path: str | os.PathLike[str]) -> bytes:
    """A tar.gz of the folder's contents (its files, directories and symbolic links, as
    links; modes and mtimes kept, owners left out: the workspace's uid owns them). FIFOs,
    sockets and devices are left out: a workspace takes none."""
    root = Path(local_path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")

    def portable(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            return None
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz", compresslevel=6) as archive:
        for entry in sorted(root.iterdir()):
            archive.add(entry, arcname=entry.name, filter=portable)
    return packed.getvalue()


def archive_of_file(local_file: str | os.PathLike[str]) -> bytes:
    return Path(local_file).read_bytes()


# Extraction of archives checked by ``unpacking_order``: tarfile's own filters (Python 3.12,
# and 3.11.4 on) would refuse the absolute links a diff may hold; Debian 12's 3.11.2 has none.
TRUSTED = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def unpacking_order(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The members of a diff in the order they are unpacked, checked: files, directories and
    symlinks only; no name absolute, with ``..``, or below a symlink of the archive; symlinks
    last, so nothing is ever written through one (where a link points is data, never
    followed). Modes lose setuid, setgid and sticky bits; owners become the caller's."""
    links = {member.name.strip("/") for member in members if member.issym()}
    first: list[tarfile.TarInfo] = []
    last: list[tarfile.TarInfo] = []
    for member in members:
        parts = [part for part in member.name.split("/") if part not in ("", ".")]
        if member.name.startswith("/") or ".." in parts:
            raise ArchiveRefused(f"diff member {member.name!r}: a path outside the folder")
        if not (member.isreg() or member.isdir() or member.issym()):
            raise ArchiveRefused(
                f"diff member {member.name!r}: only files, directories and symlinks unpack"
            )
        if any("/".join(parts[:depth]) in links for depth in range(1, len(parts))):
            raise ArchiveRefused(f"diff member {member.name!r}: below a symlink of the archive")
        member.mode &= 0o777
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        (last if member.issym() else first).append(member)
    return first + last


def unpack_diff(diff: DiffResponse, dest_dir: str | os.PathLike[str]) -> None:
    """Extract a diff's files into ``dest_dir`` (``unpacking_order`` says what is refused);
    deleted paths are in ``diff.deleted``, not acted on."""
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    content = base64.b64decode(diff.content) if diff.content else b""
    if not content:
        return
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as archive:
        extract_checked(archive, dest_dir)


def extract_checked(archive: tarfile.TarFile, dest_dir: str | os.PathLike[str]) -> None:
    members = unpacking_order(archive.getmembers())
    archive.extractall(dest_dir, members=members, **TRUSTED)  # type: ignore[arg-type]
