"""The trainer client's unpacking of a diff: what it refuses, and that it never writes through
a link, on every Python the client runs on (tarfile's filters are not in all of them)."""

from __future__ import annotations

import base64
import io
import os
import tarfile
from pathlib import Path

import pytest

from atropos_agent.client import unpack_diff
from atropos_agent.errors import ArchiveRefused
from atropos_agent.models import DiffResponse


def diff_of(*members: tuple[tarfile.TarInfo, bytes]) -> DiffResponse:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    content = base64.b64encode(buffer.getvalue()).decode()
    return DiffResponse(success=True, content=content, deleted=[], changed=[])


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def test_files_dirs_and_links_unpack_with_links_kept_as_data(tmp_path: Path) -> None:
    diff = diff_of(
        (entry("out", tarfile.DIRTYPE, 0o755), b""),
        (entry("out/run.sh", mode=0o4755), b"#!/bin/sh\n"),
        (entry("python", tarfile.SYMTYPE, link="/usr/bin/python3"), b""),
        (entry("result", tarfile.SYMTYPE, link="out/run.sh"), b""),
    )
    unpack_diff(diff, tmp_path / "d")
    assert (tmp_path / "d/out/run.sh").read_bytes() == b"#!/bin/sh\n"
    # setuid dropped, the rest of the mode kept
    assert os.stat(tmp_path / "d/out/run.sh").st_mode & 0o7777 == 0o755
    assert os.readlink(tmp_path / "d/python") == "/usr/bin/python3"
    assert (tmp_path / "d/result").read_bytes() == b"#!/bin/sh\n"


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (entry("/etc/evil"), "outside"),
        (entry("../evil"), "outside"),
        (entry("a/../../evil"), "outside"),
        (entry("dev", tarfile.CHRTYPE), "only files"),
        (entry("fifo", tarfile.FIFOTYPE), "only files"),
        (entry("hard", tarfile.LNKTYPE, link="/etc/passwd"), "only files"),
    ],
)
def test_hostile_members_are_refused_before_anything_is_written(
    tmp_path: Path, member: tarfile.TarInfo, reason: str
) -> None:
    diff = diff_of((entry("first.txt"), b"1"), (member, b""))
    with pytest.raises(ArchiveRefused, match=reason):
        unpack_diff(diff, tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


def test_nothing_is_written_through_a_link_of_the_archive(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    diff = diff_of(
        (entry("escape", tarfile.SYMTYPE, link=str(outside)), b""),
        (entry("escape/owned.txt"), b"x"),
    )
    with pytest.raises(ArchiveRefused, match="below a symlink"):
        unpack_diff(diff, tmp_path / "d")
    assert list(outside.iterdir()) == []
