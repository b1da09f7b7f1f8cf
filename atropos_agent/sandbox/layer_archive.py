"""What a layer archive may hold, unpacking one safely, and writing one from a layer's tree.

A layer travels between the executor and sandboxes as a tar.gz of its tree: directories,
regular files, symlinks, and hard links to files earlier in the same archive. Overlay marks
(whiteouts, opaque directories) of a fork's snapshot travel beside them as one JSON member,
``.atropos-layer.json`` ``{"whiteouts": [paths], "opaque": [directory paths]}``; a template
(an ordinary archive a trainer made) may not hold that member.

Unpacking checks every member before it writes it, into a fresh directory nobody else
writes, and stops at the first bad one (the caller removes the directory, so nothing partial
is left). Refused: absolute names, ``..``, a member below a symlink or below a non-directory,
a symlink whose target is absolute or leaves the tree (followed through the archive's own
links), device files, FIFOs, hard links to anything but an earlier regular file, a name given
twice (directories excepted), more entries or more bytes than the caps.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atropos_agent.errors import ArchiveRefused, TooLarge
from atropos_agent.sandbox.agent.extract import Refused, resolve_links
from atropos_agent.sandbox.agent.extract import member_path as upload_member_path
from atropos_agent.sandbox.trees import KEPT_MODE, TarWriter, walk

METADATA_NAME = ".atropos-layer.json"
# A metadata member larger than this is refused (a path list of a big snapshot stays far below).
MAX_METADATA_BYTES = 64 * 1024 * 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class Caps:
    max_entries: int
    max_bytes: int


@dataclass
class Unpacked:
    """What an archive held: entries (metadata member excluded), bytes of file data, and its
    overlay marks."""

    entry_count: int = 0
    bytes: int = 0
    whiteouts: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)


def member_path(name: str) -> str:
    """A member's name as a relative path inside the tree ("" for the root itself); raises
    for names that are absolute or leave it (the rules of uploads, ``extract.member_path``)."""
    try:
        path = upload_member_path(name)
    except Refused as exc:
        raise ArchiveRefused(str(exc)) from None
    return "" if path == "." else path


def leads_inside(path: str, target: str, links: dict[str, str]) -> bool:
    """Whether the symlink ``path`` -> ``target`` resolves inside the tree, following the
    tree's own ``links`` (relative path -> target) the way the kernel would."""
    if target.startswith("/"):
        return False
    return resolve_links([*path.split("/")[:-1], *target.split("/")], links) is not None


def checked_metadata(raw: bytes) -> tuple[list[str], list[str]]:
    try:
        data: Any = json.loads(raw)
        whiteouts, opaque = data.get("whiteouts", []), data.get("opaque", [])
        if not all(isinstance(p, str) for p in [*whiteouts, *opaque]):
            raise ValueError("paths must be strings")
    except (ValueError, AttributeError, TypeError) as exc:
        raise ArchiveRefused(f"{METADATA_NAME} is not valid: {exc}") from None
    for path in [*whiteouts, *opaque]:
        if not member_path(path):
            raise ArchiveRefused(f"{METADATA_NAME}: the root cannot be a whiteout or opaque")
    return [member_path(p) for p in whiteouts], [member_path(p) for p in opaque]


def unpack(archive: Path, into: Path, caps: Caps, *, metadata_allowed: bool) -> Unpacked:
    """Unpack the layer archive ``archive`` into the new, empty directory ``into``, checking
    every member first; raises ``ArchiveRefused`` (400) or ``TooLarge`` (413), and the caller
    removes ``into``."""
    kinds: dict[str, str] = {"": "dir"}
    links: dict[str, str] = {}
    directories: list[tuple[str, tarfile.TarInfo]] = []
    result = Unpacked()
    into.mkdir(mode=0o755)
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                path = member_path(member.name)
                if path == METADATA_NAME:
                    if not metadata_allowed:
                        raise ArchiveRefused(
                            f"member {METADATA_NAME!r}: a template may not hold the layer "
                            "metadata member"
                        )
                    if not member.isreg() or member.size > MAX_METADATA_BYTES:
                        raise ArchiveRefused(f"member {METADATA_NAME!r} is not a small file")
                    source = tar.extractfile(member)
                    assert source is not None
                    result.whiteouts, result.opaque = checked_metadata(source.read())
                    continue
                result.entry_count += 1
                if result.entry_count > caps.max_entries:
                    raise TooLarge(f"the archive holds more than {caps.max_entries} entries")
                if not path:
                    continue  # the root itself ("./")
                parent = path.rpartition("/")[0]
                check_parent(path, parent, kinds)
                seen = kinds.get(path)
                if seen is not None and not (seen == "dir" and member.isdir()):
                    raise ArchiveRefused(f"member {member.name!r} appears twice in the archive")
                target = into / path
                make_parents(into, parent, kinds)
                if member.isdir():
                    if seen is None:
                        target.mkdir(mode=0o700)
                    kinds[path] = "dir"
                    directories.append((path, member))
                elif member.isreg():
                    result.bytes += member.size
                    if result.bytes > caps.max_bytes:
                        raise TooLarge(f"the archive unpacks to more than {caps.max_bytes} bytes")
                    source = tar.extractfile(member)
                    assert source is not None
                    write_file(target, source, member)
                    kinds[path] = "file"
                elif member.issym():
                    if not member.linkname or "\x00" in member.linkname:
                        raise ArchiveRefused(f"member {member.name!r}: an empty symlink target")
                    if member.linkname.startswith("/"):
                        raise ArchiveRefused(
                            f"member {member.name!r}: symlink to the absolute path "
                            f"{member.linkname!r} (links must stay inside the tree)"
                        )
                    os.symlink(member.linkname, target)
                    kinds[path] = "link"
                    links[path] = member.linkname
                elif member.islnk():
                    source_path = member_path(member.linkname)
                    if kinds.get(source_path) != "file":
                        raise ArchiveRefused(
                            f"member {member.name!r}: hard link to {member.linkname!r}, which is "
                            "not a regular file earlier in the archive"
                        )
                    os.link(into / source_path, target)
                    kinds[path] = "file"
                else:
                    raise ArchiveRefused(
                        f"member {member.name!r}: {kind_name(member)} are not allowed "
                        "(only files, directories and symlinks)"
                    )
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveRefused(f"not a readable tar.gz archive: {exc}") from None
    except OSError as exc:
        if exc.errno in (36, 40):  # ENAMETOOLONG, ELOOP
            raise ArchiveRefused(f"a member's name cannot be created: {exc}") from None
        raise
    for path, target_name in links.items():
        if not leads_inside(path, target_name, links):
            raise ArchiveRefused(
                f"member {path!r}: symlink to {target_name!r} leads outside the tree"
            )
    for path in result.whiteouts:
        if path in kinds:
            raise ArchiveRefused(f"{METADATA_NAME}: whiteout {path!r} is also a member")
    for path in result.opaque:
        if kinds.get(path) != "dir":
            raise ArchiveRefused(f"{METADATA_NAME}: opaque {path!r} is not a directory member")
    for path, member in reversed(directories):
        os.chmod(into / path, member.mode & KEPT_MODE)
        os.utime(into / path, (member.mtime, member.mtime))
    return result


def check_parent(path: str, parent: str, kinds: dict[str, str]) -> None:
    """No member may be written through a symlink or below a file named earlier."""
    prefix = ""
    for part in parent.split("/") if parent else []:
        prefix = f"{prefix}/{part}" if prefix else part
        kind = kinds.get(prefix)
        if kind == "link":
            raise ArchiveRefused(f"member {path!r} lies below the symlink {prefix!r}")
        if kind == "file":
            raise ArchiveRefused(f"member {path!r} lies below the file {prefix!r}")


def make_parents(into: Path, parent: str, kinds: dict[str, str]) -> None:
    """Directories an archive implies but does not list."""
    prefix = ""
    for part in parent.split("/") if parent else []:
        prefix = f"{prefix}/{part}" if prefix else part
        if prefix not in kinds:
            (into / prefix).mkdir(mode=0o755)
            kinds[prefix] = "dir"


def write_file(target: Path, source: Any, member: tarfile.TarInfo) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while chunk := source.read(CHUNK):
            os.write(fd, chunk)
        os.fchmod(fd, member.mode & 0o777)
    finally:
        os.close(fd)
    os.utime(target, (member.mtime, member.mtime))


def kind_name(member: tarfile.TarInfo) -> str:
    if member.ischr() or member.isblk():
        return "device files"
    if member.isfifo():
        return "FIFOs"
    return f"members of type {member.type!r}"


def write_overlay_marks(tree: Path, whiteouts: list[str], opaque: list[str]) -> None:
    """Materialise a snapshot's marks in its tree, as an overlay reads them from a lower layer:
    a whiteout is a character device 0/0, an opaque directory has ``trusted.overlay.opaque``."""
    for path in whiteouts:
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
    for path in opaque:
        os.setxattr(tree / path, "trusted.overlay.opaque", b"y")


def pack(tree: Path, target: Path, max_bytes: int, marks: tuple[list[str], list[str]]) -> int:
    """Write ``tree`` as a layer archive at ``target``; the overlay marks ``marks``
    (whiteouts, opaque dirs) kept beside the tree, and those found in it, go in the metadata
    member. Returns the archive's size."""
    whiteouts, opaque = list(marks[0]), list(marks[1])
    writer = TarWriter(target, max_bytes)
    try:
        for entry in walk(tree):
            if entry.is_whiteout:
                whiteouts.append(entry.path)
                continue
            writer.add(entry)
            if entry.is_dir and entry.is_opaque():
                opaque.append(entry.path)
        if whiteouts or opaque:
            metadata = json.dumps({"whiteouts": whiteouts, "opaque": opaque}).encode()
            writer.add_bytes(METADATA_NAME, metadata)
        return writer.close()
    except BaseException:
        writer.discard()
        raise
