"""Workspaces made of layers on the real sandbox server: templates shared by many slots, forks
of live slots, diffs, the disk bound, the layer store, and the server's mounts. Every test of
the first part runs in both workspace modes: copy-on-write (overlay) and copy."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from atropos_agent.client import extract_checked
from harness.servers import SandboxServer, start_sandbox

GZIP = {"Content-Type": "application/gzip"}
MIB = 1024 * 1024
# Entries of a test archive: a name and bytes (a file), None (a directory), or a TarInfo.
Entries = dict[str, bytes | tarfile.TarInfo | None]


def targz(entries: Mapping[str, bytes | tarfile.TarInfo | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in entries.items():
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            member = tarfile.TarInfo(name)
            member.mode = 0o755 if data is None else 0o644
            member.mtime = 1_700_000_000
            if data is None:
                member.type = tarfile.DIRTYPE
                tar.addfile(member)
            else:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member


def template_id(archive: bytes) -> str:
    return "sha256-" + hashlib.sha256(archive).hexdigest()


def put_layer(server: SandboxServer, archive: bytes, layer_id: str | None = None) -> str:
    layer_id = layer_id or template_id(archive)
    response = server.client.put(f"/layers/{layer_id}", content=archive, headers=GZIP)
    assert response.status_code == 200, response.text
    assert response.json()["layer_id"] == layer_id
    return layer_id


def use(server: SandboxServer, slot: str, layers: list[str]) -> dict[str, Any]:
    response = server.client.post(f"/slots/{slot}/workspace", json={"layers": layers})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def sh(server: SandboxServer, slot: str, command: str) -> str:
    result = server.sh(slot, command)
    assert result["success"], result
    output: str = result["output"]
    return output


def batch_sh(server: SandboxServer, commands: dict[str, str]) -> dict[str, str]:
    """One command per slot, all in one batch (the slots run them in parallel)."""
    items = [
        {"slot_id": slot, "tool": "terminal", "args": {"command": command}}
        for slot, command in commands.items()
    ]
    response = server.client.post("/batch", json=items)
    assert response.status_code == 200, response.text
    results = response.json()
    assert all(result["success"] for result in results), results
    return {slot: result["output"] for slot, result in zip(commands, results, strict=True)}


def diff(server: SandboxServer, slot: str) -> dict[str, Any]:
    response = server.client.get(f"/slots/{slot}/diff")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["success"], answer
    return answer


def members(archive: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {member.name: member for member in tar.getmembers()}


def file_of(archive: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def layers_listed(server: SandboxServer) -> dict[str, dict[str, Any]]:
    response = server.client.get("/layers")
    assert response.status_code == 200, response.text
    return {layer["layer_id"]: layer for layer in response.json()["layers"]}


def mounts_of(pid: int | str, below: Path) -> list[str]:
    """Mount points of process ``pid`` (or "self") at or below ``below``."""
    with open(f"/proc/{pid}/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [point for point in points if point == str(below) or point.startswith(f"{below}/")]


# --------------------------------------------------------------------------- both modes


@pytest.fixture(scope="module", params=["overlay", "copy"])
def layered(request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
    """A sandbox of 18 slots building workspaces in one mode, with a 10 MiB disk bound."""
    server = start_sandbox(
        slots=18,
        env={"ATROPOS_SANDBOX_WORKSPACE_LAYERS": request.param},
        args=["--disk-mb", "10"],
    )
    yield server
    server.stop()


def mode_of(server: SandboxServer) -> str:
    mode: str = server.client.get("/health").json()["workspace_layers"]
    return mode


TEMPLATE: Entries = {
    "README": b"the template\n",
    "shared.txt": b"from the template\n",
    "keep.txt": b"keep me\n",
    "src": None,
    "src/main.py": b"print('hi')\n",
    "dir": None,
    "dir/old1": b"1\n",
    "dir/old2": b"2\n",
}


def test_health_and_store_say_the_mode(layered: SandboxServer) -> None:
    mode = layered.client.get("/health").json()["workspace_layers"]
    assert mode in ("overlay", "copy")
    answer = layered.client.get("/layers").json()
    assert answer["mode"] == mode
    assert answer["budget_bytes"] == 8192 * MIB


def test_template_in_16_slots_each_sees_only_its_own_files(layered: SandboxServer) -> None:
    archive = targz(TEMPLATE)
    layer = put_layer(layered, archive)
    slots = [f"slot_{i}" for i in range(16)]
    for slot in slots:
        assert use(layered, slot, [layer])["alive"]
    outputs = batch_sh(
        layered,
        {
            slot: f"echo {slot} > own_{slot}.txt && echo {slot} >> shared.txt && "
            "echo $(ls) && cat shared.txt"
            for slot in slots
        },
    )
    for slot, output in outputs.items():
        listing, _, shared = output.partition("\n")
        assert listing.split() == sorted(
            ["README", "dir", "keep.txt", "shared.txt", "src", f"own_{slot}.txt"]
        ), output
        assert shared.splitlines() == ["from the template", slot], output
    # Writes to a template file were copy-ups: the layer itself is unchanged.
    assert file_of(layered.client.get(f"/layers/{layer}").content, "shared.txt") == (
        b"from the template\n"
    )
    tree = layered.data_dir / "layers" / layer / "tree"
    assert (tree / "shared.txt").read_bytes() == b"from the template\n"
    assert sorted(os.listdir(tree)) == ["README", "dir", "keep.txt", "shared.txt", "src"]
    assert layers_listed(layered)[layer]["in_use"] == 16


def test_a_fresh_slot_keeps_its_agent_and_a_used_one_restarts(layered: SandboxServer) -> None:
    """A slot that ran nothing since it started gets its workspace under its running agent;
    one that ran something is restarted, as a reset would."""
    layer = put_layer(layered, targz(TEMPLATE))
    assert layered.client.post("/reset", json={"slot_id": "slot_11"}).status_code == 200
    # A reset slot is warmed again in the background (docs/sandbox.md, "Warm slots").
    deadline = time.monotonic() + 10
    while not layered.client.get("/slots").json()["slots"][11]["warm"]:
        assert time.monotonic() < deadline, "slot_11 not warm again after its reset"
        time.sleep(0.05)
    fresh_pid = layered.client.get("/slots").json()["slots"][11]["pid"]
    assert use(layered, "slot_11", [layer])["pid"] == fresh_pid
    assert sh(layered, "slot_11", "cat README && pwd") == "the template\n/workspace"
    sh(layered, "slot_11", "echo used > used.txt")
    again = use(layered, "slot_11", [layer])
    assert again["pid"] != fresh_pid
    assert sh(layered, "slot_11", "ls used.txt 2>&1 || true").count("No such") == 1
    assert "workspace_not_entered" not in layered.log()


def test_a_layer_put_twice_is_stored_once(layered: SandboxServer) -> None:
    archive = targz({"once.txt": b"once\n"})
    layer_id = template_id(archive)
    first = layered.client.put(f"/layers/{layer_id}", content=archive, headers=GZIP).json()
    again = layered.client.put(f"/layers/{layer_id}", content=archive, headers=GZIP).json()
    assert first["created"] is True and again["created"] is False
    assert first["entry_count"] == again["entry_count"] == 1
    assert layered.client.get(f"/layers/{layer_id}").content == archive


def test_missing_layers_are_named_and_nothing_changes(layered: SandboxServer) -> None:
    sh(layered, "slot_17", "echo before > f.txt")
    absent = "sha256-" + "0" * 64
    response = layered.client.post("/slots/slot_17/workspace", json={"layers": [absent]})
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "missing layers"
    assert response.json()["missing"] == [absent]
    assert sh(layered, "slot_17", "cat f.txt") == "before"
    bad = layered.client.post("/slots/slot_17/workspace", json={"layers": ["../etc"]})
    assert bad.status_code == 422, bad.text


def test_fork_of_a_live_slot(layered: SandboxServer) -> None:
    layer = put_layer(layered, targz(TEMPLATE))
    use(layered, "slot_0", [layer])
    sh(layered, "slot_0", "echo at-fork > a.txt && rm keep.txt && echo changed >> shared.txt")
    job = layered.run("slot_0", "background_run", command="sleep 30")
    assert job["success"], job
    targets = ["slot_1", "slot_2", "slot_3"]
    response = layered.client.post("/slots/slot_0/fork", json={"targets": targets})
    assert response.status_code == 200, response.text
    fork_layers = response.json()["layers"]
    assert fork_layers[0].startswith("snap-")
    if mode_of(layered) == "overlay":
        assert fork_layers == [fork_layers[0], layer]  # the fork holds only the changes
    else:
        assert fork_layers == [fork_layers[0]]  # the whole workspace, copied
    seen = batch_sh(layered, {t: "cat a.txt shared.txt; ls" for t in targets})
    for output in seen.values():
        assert "at-fork" in output and "changed" in output
        assert "keep.txt" not in output
    # Processes are not forked: no job runs in a fork.
    jobs = layered.run("slot_1", "check_background")
    assert jobs["success"] and not jobs["metadata"]["jobs"], jobs
    # The source and the forks go their own ways.
    sh(layered, "slot_0", "echo later > later.txt")
    sh(layered, "slot_1", "echo mine > fork1.txt && echo fork1 >> a.txt")
    assert sh(layered, "slot_2", "ls later.txt fork1.txt 2>&1 || true").count("No such") == 2
    assert sh(layered, "slot_0", "ls fork1.txt 2>&1 || true").count("No such") == 1
    assert sh(layered, "slot_0", "cat a.txt") == "at-fork"
    assert sh(layered, "slot_2", "cat a.txt") == "at-fork"
    # A fork's diff is against its fork source: only what it did since.
    answer = diff(layered, "slot_1")
    assert sorted(answer["changed"]) == ["a.txt", "fork1.txt"]
    assert answer["deleted"] == []
    assert diff(layered, "slot_3")["changed"] == []


def test_forks_of_forks_stay_within_the_layer_bound(layered: SandboxServer) -> None:
    """Each fork of a fork adds a layer; a chain past 32 is flattened into one snapshot."""
    use(layered, "slot_12", [put_layer(layered, targz(TEMPLATE))])
    source, target = "slot_12", "slot_13"
    depths = []
    for generation in range(34):
        sh(layered, source, f"echo {generation} >> generations.txt")
        response = layered.client.post(f"/slots/{source}/fork", json={"targets": [target]})
        assert response.status_code == 200, response.text
        depths.append(len(response.json()["layers"]))
        source, target = target, source
    assert max(depths) <= 32
    if mode_of(layered) == "overlay":
        assert depths[:3] == [2, 3, 4] and 1 in depths
    assert sh(layered, source, "cat generations.txt") == "\n".join(map(str, range(34)))
    assert sh(layered, source, "cat README") == "the template"


def test_diff_holds_exactly_what_changed(layered: SandboxServer) -> None:
    entries = dict(TEMPLATE)
    entries["link"] = special("link", tarfile.SYMTYPE, "README")
    layer = put_layer(layered, targz(entries))
    use(layered, "slot_4", [layer])
    sh(
        layered,
        "slot_4",
        "echo more >> shared.txt && rm keep.txt && rm -rf dir && mkdir dir && "
        "echo new > dir/new && mkdir -p new/deep && echo n > new/deep/n.txt && "
        "ln -s src/main.py newlink && rm link && ln -s shared.txt link && "
        "cat README > /dev/null",
    )
    answer = diff(layered, "slot_4")
    assert sorted(answer["changed"]) == [
        "dir",
        "dir/new",
        "link",
        "new",
        "new/deep",
        "new/deep/n.txt",
        "newlink",
        "shared.txt",
    ]
    assert sorted(answer["deleted"]) == ["dir", "keep.txt"]
    content = base64.b64decode(answer["content"])
    assert answer["bytes"] == len(content)
    assert answer["entry_count"] == len(answer["changed"])
    found = members(content)
    assert sorted(found) == sorted(answer["changed"])
    assert file_of(content, "shared.txt") == b"from the template\nmore\n"
    assert file_of(content, "dir/new") == b"new\n"
    assert found["newlink"].issym() and found["newlink"].linkname == "src/main.py"
    assert found["link"].linkname == "shared.txt"
    assert found["dir"].isdir()


def test_diff_applied_to_the_template_gives_the_workspace(
    layered: SandboxServer, tmp_path: Path
) -> None:
    """Delete ``deleted``, unpack the archive: the template becomes the slot's workspace."""
    archive = targz(TEMPLATE)
    layer = put_layer(layered, archive)
    use(layered, "slot_5", [layer])
    sh(
        layered,
        "slot_5",
        "rm -rf src && echo x > src && rm dir/old1 && chmod 700 dir && mkdir -p a/b && "
        "echo deep > a/b/c && echo v2 > README",
    )
    answer = diff(layered, "slot_5")
    tree = tmp_path / "tree"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        extract_checked(tar, tree)
    for path in answer["deleted"]:
        target = tree / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(answer["content"])), mode="r:gz") as tar:
        extract_checked(tar, tree)
    exported = layered.client.get("/slots/slot_5/export")
    assert exported.status_code == 200, exported.text
    whole = members(exported.content)
    ours = {str(path.relative_to(tree)): path for path in tree.rglob("*")}
    assert sorted(ours) == sorted(whole)
    for name, member in whole.items():
        if member.isfile():
            assert ours[name].read_bytes() == file_of(exported.content, name), name
    assert "dir/old1" not in ours and (tree / "src").read_text() == "x\n"


def test_disk_bound_counts_only_own_changes(layered: SandboxServer) -> None:
    """A 20 MiB template under a 10 MiB bound: reading it is free, writing 11 MiB is not."""
    big = {f"big{i}.bin": os.urandom(5 * MIB) for i in range(4)}
    layer = put_layer(layered, targz(big))
    use(layered, "slot_6", [layer])
    assert sh(layered, "slot_6", "cat big*.bin | wc -c") == str(20 * MIB)
    written = layered.sh("slot_6", "head -c 6M /dev/urandom > a.bin && echo ok")
    assert written["success"], written
    over = layered.sh("slot_6", "head -c 5M /dev/urandom > b.bin; sleep 0.3")
    assert not over["success"], over
    assert "disk" in over["metadata"]["limit_hit"], over


def test_deleted_layer_keeps_working_for_its_slots(layered: SandboxServer) -> None:
    archive = targz({"kept.txt": b"still here\n", "gone.txt": b"g\n"})
    layer = put_layer(layered, archive)
    use(layered, "slot_7", [layer])
    response = layered.client.delete(f"/layers/{layer}")
    assert response.status_code == 200, response.text
    assert response.json() == {"layer_id": layer, "removed": False}
    assert sh(layered, "slot_7", "cat kept.txt && echo w > new.txt && rm gone.txt && ls") == (
        "still here\nkept.txt\nnew.txt"
    )
    assert layers_listed(layered)[layer]["in_use"] == 1
    # A fork of a slot on a deleted layer works too.
    fork = layered.client.post("/slots/slot_7/fork", json={"targets": ["slot_8"]})
    assert fork.status_code == 200, fork.text
    assert sh(layered, "slot_8", "cat kept.txt new.txt") == "still here\nw"
    for slot in ("slot_7", "slot_8"):
        assert layered.client.post("/reset", json={"slot_id": slot}).status_code == 200
    assert layer not in layers_listed(layered)
    assert not (layered.data_dir / "layers" / layer).exists()
    assert layered.client.get(f"/layers/{layer}").status_code == 404


def test_reset_unmounts_and_empties(layered: SandboxServer) -> None:
    layer = put_layer(layered, targz(TEMPLATE))
    use(layered, "slot_9", [layer])
    sh(layered, "slot_9", "echo mine > mine.txt")
    slot_root = layered.data_dir / "slots" / "slot_9"
    mounted = mounts_of(layered.process.pid, slot_root)
    if mode_of(layered) == "overlay":
        assert str(slot_root / "lower" / "0") in mounted
        assert mounted.count(str(slot_root / "workspace")) == 2  # its own, and the overlay
    assert layered.client.post("/reset", json={"slot_id": "slot_9"}).status_code == 200
    left = mounts_of(layered.process.pid, slot_root)
    assert not [point for point in left if "/lower/" in point]
    assert left.count(str(slot_root / "workspace")) <= 1  # its own mount point at most
    assert sh(layered, "slot_9", "ls -A | wc -l") == "0"
    assert not (slot_root / "upper").exists()
    assert layers_listed(layered)[layer]["in_use"] == 0


def test_layers_travel_between_sandboxes_of_either_mode(layered: SandboxServer) -> None:
    """A fork's snapshot, fetched from one sandbox and put into another (of the other mode),
    gives the same files there: deletions of template files included."""
    archive = targz(TEMPLATE)
    layer = put_layer(layered, archive)
    use(layered, "slot_10", [layer])
    sh(layered, "slot_10", "rm keep.txt && rm -rf dir && mkdir dir && echo n > dir/n && echo x > x")
    fork = layered.client.post("/slots/slot_10/fork", json={"targets": []}).json()["layers"]
    other_mode = "copy" if mode_of(layered) == "overlay" else "overlay"
    other = start_sandbox(slots=1, env={"ATROPOS_SANDBOX_WORKSPACE_LAYERS": other_mode})
    try:
        for layer_id in fork:
            shipped = layered.client.get(f"/layers/{layer_id}")
            assert shipped.status_code == 200, shipped.text
            assert shipped.headers["content-type"] == "application/gzip"
            put_layer(other, shipped.content, layer_id)
        use(other, "slot_0", fork)
        assert sh(other, "slot_0", "echo $(ls); ls dir") == "README dir shared.txt src x\nn"
    finally:
        other.stop()


# --------------------------------------------------------------------------- the store


def test_hostile_layer_archives_are_refused_and_leave_nothing() -> None:
    server = start_sandbox(slots=1, args=["--upload-max-entries", "20", "--upload-max-mb", "1"])
    try:
        hostile: dict[str, bytes] = {
            "absolute path": targz({"/etc/evil": b"x"}),
            "dot-dot": targz({"a/../../evil": b"x"}),
            "absolute symlink": targz({"l": special("l", tarfile.SYMTYPE, "/etc/passwd")}),
            "escaping symlink": targz({"d": None, "d/l": special("d/l", tarfile.SYMTYPE, "../..")}),
            "symlink chain out": targz(
                {
                    "a": None,
                    "a/up": special("a/up", tarfile.SYMTYPE, ".."),
                    "out": special("out", tarfile.SYMTYPE, "a/up/../x"),
                }
            ),
            "member through a symlink": targz(
                {"l": special("l", tarfile.SYMTYPE, "."), "l/f": b"x"}
            ),
            "device": targz({"dev": special("dev", tarfile.CHRTYPE)}),
            "fifo": targz({"fifo": special("fifo", tarfile.FIFOTYPE)}),
            "hard link out": targz({"h": special("h", tarfile.LNKTYPE, "/etc/shadow")}),
            "hard link to a later file": targz(
                {"h": special("h", tarfile.LNKTYPE, "f"), "f": b"x"}
            ),
            "metadata in a template": targz({".atropos-layer.json": b'{"whiteouts": ["x"]}'}),
            "not an archive": b"this is not gzip",
        }
        for shape, archive in hostile.items():
            response = server.client.put(
                f"/layers/{template_id(archive)}", content=archive, headers=GZIP
            )
            assert response.status_code == 400, (shape, response.text)
            assert response.json()["error"], shape
        mismatch = targz({"f": b"x"})
        wrong = "sha256-" + "1" * 64
        response = server.client.put(f"/layers/{wrong}", content=mismatch, headers=GZIP)
        assert response.status_code == 400 and "sha256" in response.text, response.text
        too_many = targz({f"f{i}": b"x" for i in range(21)})
        response = server.client.put(
            f"/layers/{template_id(too_many)}", content=too_many, headers=GZIP
        )
        assert response.status_code == 413, response.text
        too_big = targz({"big": b"\0" * (2 * MIB)})  # compresses far below the cap
        response = server.client.put(
            f"/layers/{template_id(too_big)}", content=too_big, headers=GZIP
        )
        assert response.status_code == 413, response.text
        body_too_big = os.urandom(MIB + 1)
        response = server.client.put(
            f"/layers/{template_id(body_too_big)}", content=body_too_big, headers=GZIP
        )
        assert response.status_code == 413, response.text
        assert server.client.put("/layers/not-an-id", content=b"x", headers=GZIP).status_code == 400
        assert layers_listed(server) == {}
        store = server.data_dir / "layers"
        assert sorted(os.listdir(store)) == [".staging", ".trash"]
        assert os.listdir(store / ".staging") == [] and os.listdir(store / ".trash") == []
    finally:
        server.stop()


def test_snapshot_metadata_is_checked_too() -> None:
    server = start_sandbox(slots=1)
    try:
        escaping = targz({".atropos-layer.json": b'{"whiteouts": ["../x"], "opaque": []}'})
        snap = "snap-" + "a" * 32
        response = server.client.put(f"/layers/{snap}", content=escaping, headers=GZIP)
        assert response.status_code == 400, response.text
        assert layers_listed(server) == {}
    finally:
        server.stop()


def test_eviction_is_least_recently_used_and_spares_layers_in_use() -> None:
    server = start_sandbox(slots=2, args=["--layer-cache-mb", "1"])
    try:
        # Each layer takes ~600 KiB in the store (its files, and its archive).
        a, b, c = (targz({f"{name}.bin": os.urandom(300 * 1024)}) for name in "abc")
        layer_a = put_layer(server, a)
        use(server, "slot_0", [layer_a])
        layer_b = put_layer(server, b)
        # Over budget, but the layer just put stays, and the one in use too.
        assert sorted(layers_listed(server)) == sorted([layer_a, layer_b])
        layer_c = put_layer(server, c)
        assert sorted(layers_listed(server)) == sorted([layer_a, layer_c])
        assert sh(server, "slot_0", "wc -c < a.bin") == str(300 * 1024)
        # A fork's snapshot is a layer like any other: the unused C goes, A stays.
        sh(server, "slot_0", "head -c 200000 /dev/urandom > more.bin")
        fork = server.client.post("/slots/slot_0/fork", json={"targets": ["slot_1"]})
        assert fork.status_code == 200, fork.text
        listed = layers_listed(server)
        assert layer_a in listed and layer_c not in listed, listed
        assert sh(server, "slot_1", "wc -c < more.bin") == "200000"
        assert all(layer["in_use"] for layer in listed.values()), listed
    finally:
        server.stop()


def test_the_servers_mounts_stay_in_its_namespace_and_go_with_it() -> None:
    server = start_sandbox(slots=2, env={"ATROPOS_SANDBOX_WORKSPACE_LAYERS": "overlay"})
    directory = server.directory
    try:
        layer = put_layer(server, targz(TEMPLATE))
        use(server, "slot_0", [layer])
        assert sh(server, "slot_0", "cat README") == "the template"
        assert len(mounts_of(server.process.pid, server.data_dir)) >= 4
        assert mounts_of("self", directory) == []
        assert mounts_of(1, directory) == []
    finally:
        server.stop()
    assert mounts_of("self", directory) == []
    assert not directory.exists()


def test_copy_mode_is_used_where_asked_and_overlay_where_it_works() -> None:
    server = start_sandbox(slots=1, env={"ATROPOS_SANDBOX_WORKSPACE_LAYERS": "copy"})
    try:
        assert server.client.get("/health").json()["workspace_layers"] == "copy"
        layer = put_layer(server, targz(TEMPLATE))
        use(server, "slot_0", [layer])
        assert mounts_of(server.process.pid, server.data_dir) == []
        assert sh(server, "slot_0", "stat -c %u README") == "1000"  # the slot's own files
    finally:
        server.stop()
