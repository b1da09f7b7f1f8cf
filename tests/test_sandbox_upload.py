"""Uploads into a slot's workspace on the real sandbox server: ``PUT /slots/{id}/archive``.

Archives are extracted by the slot's agent, as the slot's uid, after every member is checked;
a refused or failed upload leaves the workspace exactly as it was (no staging directory, no
staged body in the slot's /tmp or the server's uploads directory).
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from atropos_agent.sandbox.agent.extract import Refused, check_members
from harness.servers import SandboxServer, start_sandbox, temporary_dir

MIB = 1024 * 1024
# Small caps, so that each one is cheap to go over: 2 MiB of upload, 1000 entries, a 1 MiB
# disk bound per slot.
CAPS = {
    "ATROPOS_SANDBOX_UPLOAD_MAX_MB": "2",
    "ATROPOS_SANDBOX_UPLOAD_MAX_ENTRIES": "1000",
    "ATROPOS_SANDBOX_DISK_MB": "1",
}
MTIME = 1_000_000_000
SLOT = "slot_0"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    started = start_sandbox(slots=2, env=CAPS)
    yield started
    started.stop()


@pytest.fixture
def sandbox(server: SandboxServer) -> Iterator[SandboxServer]:
    """The module's server, its slot_0 reset after each test (the disk bound is small)."""
    yield server
    response = server.client.post("/reset", json={"slot_id": SLOT})
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- helpers


def entry(name: str, data: bytes | None = b"", mode: int = 0o644, **fields: Any) -> Any:
    """A tar member: a regular file of ``data`` unless ``fields`` say otherwise."""
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = MTIME
    if data is not None and "type" not in fields:
        info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def directory(name: str, mode: int = 0o755) -> Any:
    return entry(name, None, mode, type=tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Any:
    return entry(name, None, 0o777, type=tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> Any:
    return entry(name, None, 0o644, type=tarfile.LNKTYPE, linkname=target)


def tgz(*members: Any) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def upload(
    sandbox: SandboxServer, body: Any, path: str = ".", fmt: str = "tar.gz", status: int = 200
) -> dict[str, Any]:
    response = sandbox.client.put(
        f"/slots/{SLOT}/archive",
        params={"path": path, "format": fmt},
        content=body,
        headers={"Content-Type": "application/gzip"},
    )
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


def workspace(sandbox: SandboxServer) -> Path:
    return sandbox.data_dir / "slots" / SLOT / "workspace"


def snapshot(sandbox: SandboxServer) -> dict[str, Any]:
    """Everything of the slot an upload could leave behind, seen from the host: the
    workspace's entries (kind, mode, size, content's mtime), the slot's /tmp, the server's
    staged bodies."""
    root = workspace(sandbox)
    entries: dict[str, Any] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(top, name)
            info = os.lstat(full)
            mtime = None if stat.S_ISDIR(info.st_mode) else info.st_mtime_ns
            entries[os.path.relpath(full, root)] = (info.st_mode, info.st_size, mtime)
    return {
        "workspace": entries,
        "tmp": sorted(os.listdir(sandbox.data_dir / "slots" / SLOT / "tmp")),
        "uploads": sorted(os.listdir(sandbox.data_dir / "uploads")),
    }


def prepared(sandbox: SandboxServer) -> dict[str, Any]:
    """A workspace holding a little, and its snapshot."""
    result = sandbox.sh(SLOT, "mkdir -p keep/sub && echo kept > keep/sub/file && echo x > top")
    assert result["success"], result
    before = snapshot(sandbox)
    assert "keep/sub/file" in before["workspace"]
    return before


def assert_unchanged(sandbox: SandboxServer, before: dict[str, Any]) -> None:
    after = snapshot(sandbox)
    assert after == before
    assert not [name for name in after["workspace"] if ".atropos-" in name]


# --------------------------------------------------------------------------- what goes in


def test_tree_with_nested_dirs_modes_links_owned_by_the_slot(sandbox: SandboxServer) -> None:
    body = tgz(
        directory("proj"),
        directory("proj/src/deep", 0o750),
        entry("proj/src/deep/main.py", b"print('hi')\n"),
        entry("proj/bin/run.sh", b"#!/bin/sh\necho ran\n", 0o755),
        entry("proj/secret", b"s3cret", 0o600),
        entry("proj/suid", b"#!/bin/sh\n", 0o4755),  # setuid is dropped
        symlink("proj/main", "src/deep/main.py"),
        symlink("proj/up", "../proj/src"),  # up and back in: inside the workspace
        hardlink("proj/same", "proj/secret"),
    )
    answer = upload(sandbox, body)
    assert answer == {"success": True, "error": "", "bytes": len(body), "entry_count": 9}

    root = workspace(sandbox)
    proj = root / "proj"
    assert stat.S_IMODE((proj / "bin/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((proj / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((proj / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((proj / "src/deep").stat().st_mode) == 0o750
    assert (proj / "src/deep/main.py").read_bytes() == b"print('hi')\n"
    assert (proj / "src/deep/main.py").stat().st_mtime == MTIME
    assert (proj / "src/deep").stat().st_mtime == MTIME
    assert os.readlink(proj / "main") == "src/deep/main.py"
    assert os.readlink(proj / "up") == "../proj/src"
    assert (proj / "same").stat().st_ino == (proj / "secret").stat().st_ino
    # Owned by the slot's uid, as a file it wrote itself would be.
    slot_uid = root.stat().st_uid
    if os.geteuid() == 0:
        assert slot_uid != 0
    for path in [proj, proj / "src/deep/main.py", proj / "secret", proj / "main"]:
        assert path.lstat().st_uid == slot_uid, path
    # The slot uses what it got.
    ran = sandbox.sh(SLOT, "./proj/bin/run.sh && cat proj/main && ls proj/up")
    assert ran["output"] == "ran\nprint('hi')\ndeep", ran
    assert not [name for name in os.listdir(root) if name.startswith(".atropos-")]
    assert snapshot(sandbox)["tmp"] == [] and snapshot(sandbox)["uploads"] == []


def test_a_local_tree_archived_from_its_root_into_a_new_nested_path(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """What `tar czf - -C dir .` makes (members named ./...), into a path that does not exist."""
    (tmp_path / "pkg/sub").mkdir(parents=True)
    (tmp_path / "pkg/sub/a.txt").write_text("a")
    (tmp_path / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "tool").chmod(0o755)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path, arcname=".")
    answer = upload(sandbox, buffer.getvalue(), path="deep/er/target")
    assert answer["success"], answer
    assert answer["entry_count"] == 5  # ., pkg, pkg/sub, pkg/sub/a.txt, tool
    target = workspace(sandbox) / "deep/er/target"
    assert (target / "pkg/sub/a.txt").read_text() == "a"
    assert stat.S_IMODE((target / "tool").stat().st_mode) == 0o755
    listed = sandbox.sh(SLOT, "cd /workspace/deep/er/target && find . | sort")
    assert listed["output"].split() == [".", "./pkg", "./pkg/sub", "./pkg/sub/a.txt", "./tool"]


def test_upload_into_an_existing_dir_merges(sandbox: SandboxServer) -> None:
    made = sandbox.sh(SLOT, "mkdir -p proj/old && echo keep > proj/old/k && echo v1 > proj/f")
    assert made["success"], made
    body = tgz(entry("proj/f", b"v2\n"), entry("proj/old/new", b"n"), entry("proj/added", b"a"))
    answer = upload(sandbox, body)
    assert answer["success"], answer
    proj = workspace(sandbox) / "proj"
    assert (proj / "old/k").read_text() == "keep\n"  # kept
    assert (proj / "f").read_text() == "v2\n"  # replaced
    assert (proj / "old/new").read_text() == "n"
    assert (proj / "added").read_text() == "a"
    # Into a subdirectory given as the target path, the same way.
    answer = upload(sandbox, tgz(entry("more", b"m")), path="proj/old")
    assert answer["success"], answer
    assert sorted(os.listdir(proj / "old")) == ["k", "more", "new"]


def test_format_file_writes_one_file_making_its_parents(sandbox: SandboxServer) -> None:
    data = bytes(range(256)) * 100
    answer = upload(sandbox, data, path="a/b/blob.bin", fmt="file")
    assert answer == {"success": True, "error": "", "bytes": len(data), "entry_count": 1}
    blob = workspace(sandbox) / "a/b/blob.bin"
    assert blob.read_bytes() == data
    assert blob.stat().st_uid == workspace(sandbox).stat().st_uid
    # Over an existing file: replaced, its mode kept.
    made = sandbox.sh(SLOT, "printf old > run.sh && chmod 755 run.sh")
    assert made["success"], made
    assert upload(sandbox, b"#!/bin/sh\necho new\n", path="run.sh", fmt="file")["success"]
    assert sandbox.sh(SLOT, "./run.sh")["output"] == "new"
    # Onto a directory: refused, nothing written.
    before = snapshot(sandbox)
    refused = upload(sandbox, b"x", path="a/b", fmt="file")
    assert refused["success"] is False
    assert "a/b is a directory" in refused["error"]
    assert_unchanged(sandbox, before)


# --------------------------------------------------------------------------- refused


REFUSED = {
    "absolute": ([entry("ok.txt", b"ok"), entry("/etc/evil", b"x")], "'/etc/evil': absolute"),
    "dotdot": ([entry("ok.txt", b"ok"), entry("../evil", b"x")], "'../evil': '..'"),
    "dotdot_inside": ([entry("a/../../evil", b"x")], "'a/../../evil': '..'"),
    "symlink_absolute": ([symlink("l", "/etc/passwd")], "'l': a symlink to the absolute"),
    "symlink_out": ([symlink("d/l", "../../outside")], "'d/l': a symlink to '../../outside'"),
    "symlink_out_through_a_link": (
        [symlink("here", "."), symlink("out", "here/../x")],
        "'out': a symlink to 'here/../x', which leads out",
    ),
    "symlink_loop": (
        [symlink("a", "b"), symlink("b", "a")],
        "'a': a symlink to 'b', which leads out of the workspace (or round in a loop)",
    ),
    "char_device": (
        [entry("ok.txt", b"ok"), entry("null", None, type=tarfile.CHRTYPE, devmajor=1)],
        "'null': a device file",
    ),
    "block_device": ([entry("sda", None, type=tarfile.BLKTYPE)], "'sda': a device file"),
    "fifo": ([entry("pipe", None, type=tarfile.FIFOTYPE)], "'pipe': a FIFO"),
    "hardlink_out": ([hardlink("h", "../etc/passwd")], "'h': a hard link out of the archive"),
    "hardlink_absolute": ([hardlink("h", "/etc/passwd")], "'h': a hard link out of the archive"),
    "hardlink_to_nothing": (
        [hardlink("h", "later"), entry("later", b"x")],
        "'h': a hard link to 'later', which is not an earlier file of the archive",
    ),
    "below_a_symlink": (
        [directory("d"), symlink("l", "d"), entry("l/f", b"x")],
        "'l/f': below 'l', which the archive made a link",
    ),
    "twice": ([entry("f", b"1"), entry("f", b"2")], "'f': the name appears twice"),
}


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_refused_archive_leaves_nothing(sandbox: SandboxServer, shape: str) -> None:
    members, reason = REFUSED[shape]
    before = prepared(sandbox)
    body = tgz(*members)
    answer = upload(sandbox, body)
    assert answer["success"] is False
    assert reason in answer["error"], answer
    assert answer["bytes"] == len(body)
    assert_unchanged(sandbox, before)


def test_over_the_size_cap_is_413_and_leaves_nothing(sandbox: SandboxServer) -> None:
    before = prepared(sandbox)
    # A small body that expands past the 2 MiB cap.
    answer = upload(sandbox, tgz(entry("a", bytes(MIB)), entry("b", bytes(MIB + 1))), status=413)
    assert answer["success"] is False
    assert "more than 2097152 bytes" in answer["error"], answer
    assert_unchanged(sandbox, before)
    # A body over the cap: refused as it arrives, whether its length is declared or not.
    big = os.urandom(2 * MIB + 1)
    declared = sandbox.client.put(f"/slots/{SLOT}/archive", content=big)
    assert declared.status_code == 413, declared.text
    chunked = sandbox.client.put(
        f"/slots/{SLOT}/archive", content=(big[i : i + 65536] for i in range(0, len(big), 65536))
    )
    assert chunked.status_code == 413, chunked.text
    assert "exceeds the 2097152-byte limit" in chunked.json()["error"]
    assert_unchanged(sandbox, before)


def test_over_the_entry_cap_is_413_and_leaves_nothing(sandbox: SandboxServer) -> None:
    before = prepared(sandbox)
    answer = upload(sandbox, tgz(*[entry(f"e{i}") for i in range(1001)]), status=413)
    assert answer["success"] is False
    assert "more than 1000 entries" in answer["error"], answer
    assert_unchanged(sandbox, before)


def test_over_the_disk_bound_is_refused_before_writing(sandbox: SandboxServer) -> None:
    before = prepared(sandbox)
    answer = upload(sandbox, tgz(entry("big", bytes(MIB + MIB // 2))))
    assert answer["success"] is False
    assert "would exceed the workspace disk limit of 1 MiB" in answer["error"], answer
    assert_unchanged(sandbox, before)


def test_disk_bound_reached_midway_leaves_nothing(sandbox: SandboxServer) -> None:
    """400 one-byte files: 400 bytes by their headers, 1.6 MB of blocks on disk."""
    before = prepared(sandbox)
    answer = upload(sandbox, tgz(*[entry(f"many/f{i}", b"x") for i in range(400)]))
    assert answer["success"] is False
    assert "over its disk limit of 1 MiB" in answer["error"], answer
    assert "nothing was extracted" in answer["error"]
    assert_unchanged(sandbox, before)


def test_damaged_archive_leaves_nothing(sandbox: SandboxServer) -> None:
    before = prepared(sandbox)
    body = tgz(entry("first", b"1" * 1000), entry("second", os.urandom(200_000)))
    cut = upload(sandbox, body[: len(body) - 50_000])
    assert cut["success"] is False
    assert "damaged" in cut["error"], cut
    assert_unchanged(sandbox, before)
    not_gzip = upload(sandbox, b"this is not an archive")
    assert not_gzip["success"] is False
    assert "not a tar.gz archive" in not_gzip["error"], not_gzip
    assert_unchanged(sandbox, before)


@pytest.mark.parametrize("path", ["../x", "/etc", "out/x", "keep/sub/file"])
def test_target_path_outside_the_workspace_or_not_a_dir_is_refused(
    sandbox: SandboxServer, path: str
) -> None:
    assert sandbox.sh(SLOT, "ln -s /tmp out")["success"]
    before = prepared(sandbox)
    answer = upload(sandbox, tgz(entry("f", b"x")), path=path)
    assert answer["success"] is False
    reason = "is not a directory" if path.startswith("keep") else "workspace"
    assert reason in answer["error"], answer
    assert_unchanged(sandbox, before)


def test_refused_requests(sandbox: SandboxServer) -> None:
    body = tgz(entry("f", b"x"))
    unknown = sandbox.client.put("/slots/slot_9/archive", content=body)
    assert unknown.status_code == 404, unknown.text
    bad_format = sandbox.client.put(f"/slots/{SLOT}/archive?format=zip", content=body)
    assert bad_format.status_code == 422, bad_format.text
    anonymous = httpx.put(f"{sandbox.url}/slots/{SLOT}/archive", content=body)
    assert anonymous.status_code == 401, anonymous.text
    assert "f" not in os.listdir(workspace(sandbox))


def test_json_routes_keep_their_own_cap(sandbox: SandboxServer) -> None:
    """The upload's cap is its route's alone: a JSON body is still held to max_request_bytes
    and the I-JSON rule."""
    response = sandbox.client.post(
        "/execute", content=b'{"slot_id": "slot_0", "tool": "terminal", "args": {"x": NaN}}'
    )
    assert response.status_code == 400, response.text
    # A PUT of another path is no upload.
    other = sandbox.client.put(f"/slots/{SLOT}/archivex", content=b"x")
    assert other.status_code in (404, 405), other.text


def test_upload_waits_for_the_slots_running_call(sandbox: SandboxServer) -> None:
    """The body reaches the slot only once the slot is the upload's: it runs after a call
    already running, not beside it."""
    import threading

    results: dict[str, Any] = {}

    def slow() -> None:
        results["call"] = sandbox.sh(SLOT, "sleep 1; ls /tmp; ls /workspace")

    runner = threading.Thread(target=slow)
    runner.start()
    try:
        import time

        time.sleep(0.3)
        assert upload(sandbox, tgz(entry("late.txt", b"l")))["success"]
    finally:
        runner.join(timeout=30)
    assert "late.txt" not in results["call"]["output"]
    assert ".atropos-upload" not in results["call"]["output"]
    assert (workspace(sandbox) / "late.txt").read_bytes() == b"l"


def test_a_server_started_again_has_no_leftover_uploads() -> None:
    """Bodies staged by an earlier run of the server (killed mid-upload) are removed."""
    with temporary_dir() as directory:
        data_dir = directory / "data"
        (data_dir / "uploads").mkdir(parents=True)
        (data_dir / "uploads" / "stale").write_bytes(b"x")
        server = start_sandbox(slots=1, args=["--data-dir", str(data_dir)])
        try:
            assert os.listdir(data_dir / "uploads") == []
            assert stat.S_IMODE((data_dir / "uploads").stat().st_mode) == 0o700
        finally:
            server.stop()


def test_upload_without_isolation(sandbox_factory: Any) -> None:
    """With --isolation none the agent works on the host paths; the same rules hold."""
    uid_base = str(5_100_000 + (os.getpid() % 20_000) * 64)
    server = sandbox_factory(args=["--isolation", "none", "--slot-uid-base", uid_base], slots=1)
    body = tgz(directory("d"), entry("d/x.sh", b"#!/bin/sh\necho x\n", 0o755), symlink("l", "d"))
    answer = upload(server, body, path="in")
    assert answer["success"], answer
    root = server.data_dir / "slots" / SLOT / "workspace"
    assert stat.S_IMODE((root / "in/d/x.sh").stat().st_mode) == 0o755
    assert (root / "in/d/x.sh").stat().st_uid == root.stat().st_uid
    refused = upload(server, tgz(symlink("l2", "../../..")), path="in")
    assert refused["success"] is False and "leads out of the workspace" in refused["error"]
    assert sorted(os.listdir(root / "in")) == ["d", "l"]
    assert os.listdir(server.data_dir / "slots" / SLOT / "tmp") == []


# --------------------------------------------------------------------------- the checks alone


def checked(*members: Any, base: str = ".") -> list[str]:
    plan = check_members([info for info, _ in members], base, max_entries=100, max_bytes=MIB)
    return [path for path, _ in plan.members]


def test_links_are_resolved_as_the_kernel_would() -> None:
    # `..` after a link goes up from where the link leads: `a/../../x` is `x` at the root
    # (a lexical check would take it for `../x`), one more `..` leaves the workspace.
    assert checked(directory("sub/deeper"), symlink("a", "sub/deeper"), symlink("b", "a/../../x"))
    with pytest.raises(Refused, match=re.escape("'b': a symlink to 'a/../../../x', which leads")):
        checked(directory("sub/deeper"), symlink("a", "sub/deeper"), symlink("b", "a/../../../x"))
    # A link's target may go through a link that comes later in the archive.
    assert checked(symlink("b", "a/f"), symlink("a", "d"), directory("d"))
    # Extracted below `in/`, a link may go up to the workspace's root, not beyond it.
    assert checked(symlink("l", "../top"), base="in")
    with pytest.raises(Refused, match="leads out of the workspace"):
        checked(symlink("l", "../../top"), base="in")


def test_names_are_normalised_and_the_root_is_a_directory() -> None:
    assert checked(directory("."), entry("./a//b", b"x"), directory("./a/")) == [".", "a/b", "a"]
    with pytest.raises(Refused, match="the archive's root must be a directory"):
        checked(entry("./", b"x"))
    with pytest.raises(Refused, match="'a': the archive has entries below it"):
        checked(entry("a/b", b"x"), entry("a", b"y"))
    with pytest.raises(Refused, match="more than 2 entries") as caught:
        check_members([entry(f"f{i}")[0] for i in range(3)], ".", max_entries=2, max_bytes=MIB)
    assert caught.value.limit == "entries"
