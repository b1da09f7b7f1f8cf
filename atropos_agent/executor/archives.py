"""What a template's archive may hold: checked before the executor keeps it.

The rules are an upload's, applied by the same code the slot agent extracts with
(``sandbox/agent/extract.check_members``, standard library only): no absolute path and no
``..``; no device, FIFO or other special file; a symlink's target inside the workspace,
followed through the archive's own links; a hard link only to an earlier file of the archive;
no name twice; the entry count and the files' total size under their caps. One more rule is
a template's own: no ``.atropos-layer.json``, the name sandboxes give the metadata of the
layers they write themselves.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from atropos_agent.errors import ArchiveRefused, TooLarge
from atropos_agent.sandbox.agent.extract import Refused, check_members, member_path

LAYER_METADATA = ".atropos-layer.json"


@dataclass(frozen=True)
class ArchiveCaps:
    max_bytes: int
    max_entries: int


def check_archive(path: Path, caps: ArchiveCaps) -> int:
    """The entry count of the tar.gz at ``path``, every header read and checked:
    ``ArchiveRefused`` (400) naming the first entry a workspace may not hold, ``TooLarge``
    (413) beyond a cap. Reads headers only; nothing is extracted."""
    size = path.stat().st_size
    if size > caps.max_bytes:
        raise TooLarge(f"the archive is {size} bytes, over the {caps.max_bytes}-byte cap")
    try:
        with tarfile.open(path, mode="r|gz") as archive:
            plan = check_members(
                without_layer_metadata(archive), ".", caps.max_entries, caps.max_bytes
            )
    except Refused as exc:
        raise (TooLarge if exc.limit else ArchiveRefused)(f"archive refused: {exc}") from None
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveRefused(f"not a readable tar.gz archive: {exc}") from None
    return len(plan.members)


def without_layer_metadata(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    for member in members:
        if member_path(member.name) == LAYER_METADATA:
            raise Refused(f"member {member.name!r}: that name is reserved for the service")
        yield member
