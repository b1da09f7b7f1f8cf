"""Artifact routes of the real sandbox server: read, list and archive a slot's workspace files."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import tarfile
import uuid
from typing import Any

import pytest

from harness.servers import SandboxServer

BINARY = bytes(range(256)) * 3 + b"\x00\xff\xfe"


def fresh_dir(sandbox: SandboxServer, slot: str = "slot_0") -> str:
    """A new, empty directory in a slot's workspace (the server is shared by the module)."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    result = sandbox.sh(slot, f"mkdir {name}")
    assert result["success"], result
    return name


def post(sandbox: SandboxServer, route: str, **body: Any) -> dict[str, Any]:
    body.setdefault("slot_id", "slot_0")
    response = sandbox.client.post(f"/artifacts/{route}", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def write(sandbox: SandboxServer, path: str, content: str, slot: str = "slot_0") -> None:
    result = sandbox.run(slot, "write_file", path=path, content=content)
    assert result["success"], result


def write_binary(sandbox: SandboxServer, path: str, data: bytes, slot: str = "slot_0") -> None:
    encoded = base64.b64encode(data).decode()
    result = sandbox.sh(slot, f"printf %s {encoded} | base64 -d > {path}")
    assert result["success"], result


def untar(answer: dict[str, Any]) -> tarfile.TarFile:
    assert answer["success"], answer
    assert answer["encoding"] == "base64"
    assert answer["format"] == "tar.gz"
    data = base64.b64decode(answer["content"])
    assert answer["bytes"] == len(data)
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")


# --------------------------------------------------------------------------- read


def test_read_text(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    write(sandbox, f"{d}/hello.txt", "héllo\nworld\n")
    answer = post(sandbox, "read", path=f"{d}/hello.txt")
    assert answer["success"] is True
    assert answer["error"] == ""
    assert answer["encoding"] == "text"
    assert answer["content"] == "héllo\nworld\n"
    size = len("héllo\nworld\n".encode())
    assert answer["bytes"] == size
    assert answer["file_size"] == size
    assert answer["truncated"] is False
    assert answer["path"] == f"{d}/hello.txt"
    assert answer["mime"] == "text/plain"
    assert answer["sha256"] is None
    assert answer["file_sha256"] is None


def test_read_base64_round_trips_binary(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    write_binary(sandbox, f"{d}/blob.bin", BINARY)
    answer = post(sandbox, "read", path=f"{d}/blob.bin", encoding="base64")
    assert answer["success"] is True, answer
    assert answer["encoding"] == "base64"
    assert base64.b64decode(answer["content"]) == BINARY
    assert answer["bytes"] == answer["file_size"] == len(BINARY)
    assert answer["truncated"] is False


def test_read_max_bytes_truncates(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    write_binary(sandbox, f"{d}/blob.bin", BINARY)
    answer = post(sandbox, "read", path=f"{d}/blob.bin", encoding="base64", max_bytes=100)
    assert answer["success"] is True, answer
    assert answer["truncated"] is True
    assert answer["bytes"] == 100
    assert answer["file_size"] == len(BINARY)
    assert base64.b64decode(answer["content"]) == BINARY[:100]

    text = post(sandbox, "read", path=f"{d}/blob.bin", max_bytes=0)
    assert text["success"] is True
    assert (text["truncated"], text["bytes"], text["content"]) == (True, 0, "")

    exact = post(sandbox, "read", path=f"{d}/blob.bin", encoding="base64", max_bytes=len(BINARY))
    assert exact["truncated"] is False
    assert base64.b64decode(exact["content"]) == BINARY


def test_read_sha256_is_of_the_bytes_returned(sandbox: SandboxServer) -> None:
    """As the old service: ``sha256`` hashes what was returned; ``file_sha256`` (ours) the
    whole file."""
    d = fresh_dir(sandbox)
    write_binary(sandbox, f"{d}/blob.bin", BINARY)
    answer = post(
        sandbox, "read", path=f"{d}/blob.bin", encoding="base64", include_sha256=True, max_bytes=10
    )
    assert answer["success"] is True, answer
    assert answer["truncated"] is True
    assert answer["sha256"] == hashlib.sha256(BINARY[:10]).hexdigest()
    assert answer["file_sha256"] == hashlib.sha256(BINARY).hexdigest()
    whole = post(sandbox, "read", path=f"{d}/blob.bin", encoding="base64", include_sha256=True)
    assert whole["truncated"] is False
    assert whole["sha256"] == whole["file_sha256"] == hashlib.sha256(BINARY).hexdigest()


# The old service's suffix table, exactly; anything else is application/octet-stream.
OLD_MIME_TABLE = {
    "a.png": "image/png",
    "a.jpg": "image/jpeg",
    "a.jpeg": "image/jpeg",
    "a.webp": "image/webp",
    "a.gif": "image/gif",
    "a.txt": "text/plain",
    "a.log": "text/plain",
    "a.json": "application/json",
    "a.xml": "application/xml",
    "a.html": "text/html",
    "a.md": "text/markdown",
    "a.tgz": "application/gzip",
    "a.tar.gz": "application/gzip",
    "A.PNG": "image/png",
    "a.gz": "application/octet-stream",
    "a.csv": "application/octet-stream",
    "a.py": "application/octet-stream",
    "a.htm": "application/octet-stream",
    "a.svg": "application/octet-stream",
    "noext": "application/octet-stream",
}


def test_read_mime_types(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    names = " ".join(OLD_MIME_TABLE)
    assert sandbox.sh("slot_0", f"cd {d} && touch {names}")["success"]
    for name, mime in OLD_MIME_TABLE.items():
        assert post(sandbox, "read", path=f"{d}/{name}")["mime"] == mime, name
    write(sandbox, f"{d}/data.json", '{"a": 1}')
    json_answer = post(sandbox, "read", path=f"{d}/data.json")
    assert json_answer["content"] == '{"a": 1}'


def test_read_path_is_normalised_and_workspace_absolute_accepted(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    write(sandbox, f"{d}/sub/file.txt", "content")
    for given in (
        f"./{d}/sub/../sub/./file.txt",
        f"{d}//sub/file.txt",
        f"/workspace/{d}/sub/file.txt",
        f"/workspace/./{d}/sub/file.txt",
    ):
        answer = post(sandbox, "read", path=given)
        assert answer["success"] is True, (given, answer)
        assert answer["path"] == f"{d}/sub/file.txt", given
        assert answer["content"] == "content"


def test_read_missing_file(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    answer = post(sandbox, "read", path=f"{d}/nope.txt")
    assert answer["success"] is False
    assert "no such file" in answer["error"]
    assert "nope.txt" in answer["error"]
    assert not answer.get("content")


def test_read_directory_is_an_error(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    for path, name in ((d, d), (f"/workspace/{d}/", d), (".", "/workspace")):
        for sha in (False, True):
            answer = post(sandbox, "read", path=path, include_sha256=sha)
            assert answer["success"] is False
            assert answer["error"] == f"{name} is a directory", answer


def test_read_request_validation(sandbox: SandboxServer) -> None:
    for body in (
        {"slot_id": "slot_0"},
        {"slot_id": "slot_0", "path": "x", "encoding": "hex"},
        {"slot_id": "slot_0", "path": "x", "max_bytes": -1},
    ):
        response = sandbox.client.post("/artifacts/read", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]


# --------------------------------------------------------------------------- list


def make_tree(sandbox: SandboxServer) -> str:
    d = fresh_dir(sandbox)
    write(sandbox, f"{d}/a.txt", "aaa")
    write(sandbox, f"{d}/b.txt", "bbbbb")
    write(sandbox, f"{d}/sub/c.txt", "c")
    write(sandbox, f"{d}/sub/deeper/d.txt", "dddd")
    return d


def test_list_non_recursive(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "list", path=d)
    assert answer["success"] is True, answer
    assert answer["truncated"] is False
    entries = {entry["path"]: entry for entry in answer["entries"]}
    assert set(entries) == {f"{d}/a.txt", f"{d}/b.txt", f"{d}/sub"}
    assert entries[f"{d}/a.txt"]["is_dir"] is False
    assert entries[f"{d}/a.txt"]["size"] == 3
    assert entries[f"{d}/b.txt"]["size"] == 5
    assert entries[f"{d}/sub"]["is_dir"] is True
    for entry in answer["entries"]:
        assert set(entry) == {"path", "is_dir", "size", "mtime"}
        assert isinstance(entry["mtime"], float)
        assert entry["mtime"] > 1_600_000_000


def test_list_recursive(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "list", path=d, recursive=True)
    assert answer["success"] is True, answer
    entries = {entry["path"]: entry for entry in answer["entries"]}
    assert set(entries) == {
        f"{d}/a.txt",
        f"{d}/b.txt",
        f"{d}/sub",
        f"{d}/sub/c.txt",
        f"{d}/sub/deeper",
        f"{d}/sub/deeper/d.txt",
    }
    assert entries[f"{d}/sub/deeper"]["is_dir"] is True
    assert entries[f"{d}/sub/deeper/d.txt"]["size"] == 4
    assert answer["truncated"] is False


def test_list_workspace_root_and_absolute(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    root = post(sandbox, "list")
    assert root["success"] is True
    assert d in {entry["path"] for entry in root["entries"]}
    absolute = post(sandbox, "list", path=f"/workspace/{d}/sub")
    assert {entry["path"] for entry in absolute["entries"]} == {f"{d}/sub/c.txt", f"{d}/sub/deeper"}


def test_list_max_entries_truncates(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "list", path=d, recursive=True, max_entries=2)
    assert answer["success"] is True
    assert answer["truncated"] is True
    assert len(answer["entries"]) == 2
    enough = post(sandbox, "list", path=d, recursive=True, max_entries=6)
    assert enough["truncated"] is False
    assert len(enough["entries"]) == 6


def test_list_of_a_file_is_that_file(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    for recursive in (False, True):
        answer = post(sandbox, "list", path=f"{d}/sub/c.txt", recursive=recursive)
        assert answer["success"] is True, answer
        assert answer["truncated"] is False
        [entry] = answer["entries"]
        assert (entry["path"], entry["is_dir"], entry["size"]) == (f"{d}/sub/c.txt", False, 1)
    bounded = post(sandbox, "list", path=f"{d}/a.txt", max_entries=0)
    assert (bounded["success"], bounded["entries"], bounded["truncated"]) == (True, [], True)


def test_list_of_a_missing_path_fails(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "list", path=f"{d}/missing")
    assert answer["success"] is False
    assert answer["error"] == f"no such file or directory: {d}/missing"


# --------------------------------------------------------------------------- archive


def test_archive_contents(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    write_binary(sandbox, f"{d}/sub/blob.bin", BINARY)
    answer = post(sandbox, "archive", path=d)
    with untar(answer) as archive:
        # Files only, named from the workspace root, in sorted path order (the old shape).
        assert archive.getnames() == [
            f"{d}/a.txt",
            f"{d}/b.txt",
            f"{d}/sub/blob.bin",
            f"{d}/sub/c.txt",
            f"{d}/sub/deeper/d.txt",
        ]
        assert answer["entry_count"] == 5
        assert answer["truncated"] is False
        assert all(member.isfile() for member in archive.getmembers())

        def content(name: str) -> bytes:
            handle = archive.extractfile(f"{d}/{name}")
            assert handle is not None
            return handle.read()

        assert content("a.txt") == b"aaa"
        assert content("sub/deeper/d.txt") == b"dddd"
        assert content("sub/blob.bin") == BINARY


def test_archive_tgz_format_and_workspace_absolute(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "archive", path=f"/workspace/{d}/sub", format="tgz")
    with untar(answer) as archive:
        assert archive.getnames() == [f"{d}/sub/c.txt", f"{d}/sub/deeper/d.txt"]


def test_archive_whole_workspace_by_default(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    with untar(post(sandbox, "archive")) as archive:
        names = archive.getnames()
        assert f"{d}/sub/deeper/d.txt" in names
        assert d not in names  # no directory entries


def test_archive_rejects_unknown_format(sandbox: SandboxServer) -> None:
    response = sandbox.client.post(
        "/artifacts/archive", json={"slot_id": "slot_0", "path": ".", "format": "zip"}
    )
    assert response.status_code == 422
    assert "format" in response.json()["error"]


def test_archive_max_entries_keeps_the_first_files(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)  # 4 files below d (and 2 directories, which are not entries)
    first = post(sandbox, "archive", path=d, max_entries=3)
    assert first["success"] is True, first
    assert first["entry_count"] == 3
    assert first["truncated"] is True
    with untar(first) as archive:
        assert archive.getnames() == [f"{d}/a.txt", f"{d}/b.txt", f"{d}/sub/c.txt"]
    exact = post(sandbox, "archive", path=d, max_entries=4)
    assert (exact["success"], exact["entry_count"], exact["truncated"]) == (True, 4, False)


def test_archive_max_entries_zero_on_empty_dir(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    answer = post(sandbox, "archive", path=d, max_entries=0)
    assert answer["success"] is True, answer
    assert answer["entry_count"] == 0
    with untar(answer) as archive:
        assert archive.getnames() == []


def test_archive_of_a_single_file_holds_that_file(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    answer = post(sandbox, "archive", path=f"{d}/sub/c.txt")
    assert answer["entry_count"] == 1
    with untar(answer) as archive:
        assert archive.getnames() == [f"{d}/sub/c.txt"]
        handle = archive.extractfile(f"{d}/sub/c.txt")
        assert handle is not None
        assert handle.read() == b"c"


def test_archive_max_bytes(sandbox: SandboxServer) -> None:
    d = fresh_dir(sandbox)
    # Random bytes do not compress: the archive is larger than the file.
    sandbox.sh("slot_0", f"head -c 200000 /dev/urandom > {d}/noise.bin")
    refused = post(sandbox, "archive", path=d, max_bytes=50_000)
    small = post(sandbox, "archive", path=d, max_bytes=1_000_000)
    with untar(small) as archive:
        handle = archive.extractfile(f"{d}/noise.bin")
        assert handle is not None
        assert len(handle.read()) == 200000
    assert 200_000 < small["bytes"] <= 1_000_000
    # Too large: the archive's real size, as the old service answered.
    assert refused["success"] is False
    assert refused["bytes"] == small["bytes"]
    assert refused["entry_count"] == 1
    assert refused["error"] == (
        f"archive of {small['bytes']} bytes exceeds max_bytes=50000; raise it (up to the "
        "sandbox's file limit) or archive a subdirectory"
    )
    assert not refused.get("content")


# --------------------------------------------------------------------------- escapes

ESCAPE_WORDS = ("escape", "symlink", "outside")


def assert_refused(answer: dict[str, Any]) -> None:
    assert answer["success"] is False, answer
    assert any(word in answer["error"] for word in ESCAPE_WORDS), answer["error"]
    assert "root:" not in answer.get("content", "")
    assert not answer.get("entries")


@pytest.mark.parametrize("path", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "/"])
@pytest.mark.parametrize("route", ["read", "list", "archive"])
def test_escaping_paths_refused(sandbox: SandboxServer, route: str, path: str) -> None:
    assert_refused(post(sandbox, route, path=path))


@pytest.fixture(scope="module")
def outward_links(sandbox: SandboxServer) -> str:
    d = fresh_dir(sandbox)
    result = sandbox.sh(
        "slot_0",
        f"cd {d} && ln -s /etc etclink && ln -s /etc/passwd pw && ln -s ../../.. up "
        "&& echo inside > ok.txt && ln -s ok.txt good",
    )
    assert result["success"], result
    return d


@pytest.mark.parametrize("target", ["etclink/passwd", "pw", "etclink", "up", "up/etc/passwd"])
@pytest.mark.parametrize("route", ["read", "list", "archive"])
def test_symlinks_out_refused(
    sandbox: SandboxServer, outward_links: str, route: str, target: str
) -> None:
    assert_refused(post(sandbox, route, path=f"{outward_links}/{target}"))


def test_symlink_refusal_names_the_symlink(sandbox: SandboxServer, outward_links: str) -> None:
    answer = post(sandbox, "read", path=f"{outward_links}/pw")
    assert answer["success"] is False
    assert "symlink" in answer["error"]


def test_symlink_inside_workspace_is_followed(sandbox: SandboxServer, outward_links: str) -> None:
    answer = post(sandbox, "read", path=f"{outward_links}/good")
    assert answer["success"] is True, answer
    assert answer["content"] == "inside\n"
    assert answer["path"] == f"{outward_links}/ok.txt"


def test_archive_stores_outward_symlinks_as_symlinks(
    sandbox: SandboxServer, outward_links: str
) -> None:
    answer = post(sandbox, "archive", path=outward_links)
    with untar(answer) as archive:
        members = {
            member.name.removeprefix(f"{outward_links}/"): member for member in archive.getmembers()
        }
        assert set(members) == {"etclink", "pw", "up", "ok.txt", "good"}
        for name, target in (("etclink", "/etc"), ("pw", "/etc/passwd"), ("up", "../../..")):
            assert members[name].issym(), name
            assert members[name].linkname == target
            assert members[name].size == 0
        assert members["good"].issym()
        assert answer["entry_count"] == 5  # links count as entries, as files do
        handle = archive.extractfile(f"{outward_links}/ok.txt")
        assert handle is not None
        assert handle.read() == b"inside\n"
    # No byte of the link targets' content is in the archive.
    plain = gzip.decompress(base64.b64decode(answer["content"]))
    assert b"root:" not in plain


def test_list_shows_outward_symlinks_without_following(
    sandbox: SandboxServer, outward_links: str
) -> None:
    answer = post(sandbox, "list", path=outward_links, recursive=True)
    assert answer["success"] is True
    paths = {entry["path"] for entry in answer["entries"]}
    assert f"{outward_links}/etclink" in paths
    assert not any(path.startswith(f"{outward_links}/etclink/") for path in paths)
    assert not any(path.startswith(f"{outward_links}/up/") for path in paths)


# --------------------------------------------------------------------------- slots


def test_artifacts_are_per_slot(sandbox: SandboxServer) -> None:
    name = f"private_{uuid.uuid4().hex[:8]}.txt"
    write(sandbox, name, "slot zero only", slot="slot_0")
    assert post(sandbox, "read", path=name, slot_id="slot_0")["content"] == "slot zero only"
    other = post(sandbox, "read", path=name, slot_id="slot_1")
    assert other["success"] is False
    assert "no such file" in other["error"]
    listed = post(sandbox, "list", slot_id="slot_1")
    assert name not in {entry["path"] for entry in listed["entries"]}
    with untar(post(sandbox, "archive", slot_id="slot_1")) as archive:
        assert name not in archive.getnames()
    # Nor through a path that climbs into the sibling slot's directory on the host.
    sneaky = post(sandbox, "read", path=f"../../slot_0/workspace/{name}", slot_id="slot_1")
    assert_refused(sneaky)


def test_unknown_slot_404(sandbox: SandboxServer) -> None:
    for route in ("read", "list", "archive"):
        response = sandbox.client.post(
            f"/artifacts/{route}", json={"slot_id": "slot_99", "path": "x"}
        )
        assert response.status_code == 404, route
        assert "slot_99" in response.json()["error"]


def test_archive_of_a_missing_path_or_special_files(sandbox: SandboxServer) -> None:
    d = make_tree(sandbox)
    missing = post(sandbox, "archive", path=f"{d}/missing")
    assert missing["success"] is False
    assert missing["error"] == f"no such file or directory: {d}/missing"
    # FIFOs, sockets and devices are not files of an archive (nor does a FIFO hang it).
    assert sandbox.sh("slot_0", f"mkfifo {d}/sub/pipe")["success"]
    answer = post(sandbox, "archive", path=f"{d}/sub")
    with untar(answer) as archive:
        assert archive.getnames() == [f"{d}/sub/c.txt", f"{d}/sub/deeper/d.txt"]
