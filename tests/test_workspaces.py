"""Workspaces on the real service: uploads, templates, forks and diffs, through the trainer's
client, on an executor whose pool is two real sandboxes of eight slots.

Each test names its trajectories in a group of its own and releases the group when it ends,
so every test starts with all sixteen slots free.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from atropos_agent.client import AsyncExecutorClient, ExecutorClient, ExecutorError
from atropos_agent.models import LeaseOptions
from harness.servers import ExecutorServer, start_executor
from tests.executor_support import settings, wait_for
from tests.workspace_support import HOSTILE, file, tgz

SLOTS = 8
GROUPS = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[ExecutorServer]:
    """Two sandboxes of eight slots, small upload caps (2 MiB, 1,000 entries)."""
    started = start_executor(
        env=settings(
            slots=str(SLOTS),
            min_containers="2",
            max_containers="2",
            upload_max_mb="2",
            upload_max_entries="1000",
            acquire_timeout_s="3",
        )
    )
    yield started
    started.stop()


@pytest.fixture
def client(server: ExecutorServer) -> Iterator[ExecutorClient]:
    with ExecutorClient(server.url, token=server.token) as opened:
        yield opened


@pytest.fixture
def group(client: ExecutorClient) -> Iterator[str]:
    """A group for the test's trajectories, released (slots reset) when it ends."""
    name = f"test-{next(GROUPS)}"
    yield name
    client.release_group(name, reset_workspace=True)


def sh(client: ExecutorClient, trajectory: str, command: str, **lease: Any) -> str:
    """Run ``command`` in the trajectory's slot; its output (it must succeed)."""
    options = LeaseOptions(**lease) if lease else None
    result = client.execute(trajectory, "terminal", {"command": command}, lease=options)
    assert result.success, result
    return result.output


def files_of(client: ExecutorClient, trajectory: str) -> list[str]:
    listing = client.list_artifacts(trajectory, recursive=True)
    assert listing.success, listing
    return sorted(entry.path for entry in listing.entries)


def make_repo(root: Path) -> Path:
    """A small repository: nested directories, an executable, a private file, a link."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret.txt").write_text("s\n")
    (root / "secret.txt").chmod(0o600)
    (root / "link").symlink_to("src/pkg/mod.py")
    return root


# --------------------------------------------------------------------------- uploads


def test_upload_dir_keeps_the_tree_its_modes_and_links(
    client: ExecutorClient, group: str, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    answer = client.upload_dir("up-1", repo, path="work", lease=LeaseOptions(group=group))
    assert answer.success and answer.entry_count == 6 and answer.bytes > 0
    listing = sh(client, "up-1", "cd work && stat -c '%n %A %u' run.sh secret.txt src/pkg/mod.py")
    uid = sh(client, "up-1", "id -u")
    assert listing.splitlines() == [
        f"run.sh -rwxr-xr-x {uid}",
        f"secret.txt -rw------- {uid}",
        f"src/pkg/mod.py -rw-r--r-- {uid}",
    ]
    assert sh(client, "up-1", "readlink work/link; cat work/link") == "src/pkg/mod.py\nVALUE = 1"
    assert sh(client, "up-1", "./work/run.sh") == "ran"


def test_upload_as_base64_json_and_as_one_file(
    server: ExecutorServer, client: ExecutorClient, group: str, tmp_path: Path
) -> None:
    archive = tgz(file("a/b.txt", b"from json"))
    body = {
        "trajectory_id": "up-2",
        "group": group,
        "path": "in",
        "content": base64.b64encode(archive).decode(),
    }
    response = server.client.post("/artifacts/upload", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "error": "",
        "bytes": len(archive),
        "entry_count": 1,
    }
    single = tmp_path / "data.bin"
    single.write_bytes(bytes(range(256)))
    assert client.upload_file("up-2", single, "in/data.bin").success
    assert sh(client, "up-2", "cat in/a/b.txt; echo; sha256sum < in/data.bin | cut -c1-8") == (
        "from json\n40aff2e9"
    )
    bad = server.client.post("/artifacts/upload", json={**body, "content": "%%%"})
    assert bad.status_code == 400 and "base64" in bad.json()["error"]


REFUSED = {
    **{shape: (400, archive) for shape, archive in HOSTILE.items()},
    # Files of 3 MiB in a small archive: over the 2 MiB cap once extracted.
    "over size": (413, tgz(file("zeros", bytes(3 * 1024 * 1024)))),
    "over entries": (413, tgz(*(file(f"f{i}") for i in range(1001)))),
    # A body over the cap never reaches a sandbox.
    "body over size": (413, os.urandom(3 * 1024 * 1024)),
}


@pytest.mark.parametrize("shape", sorted(REFUSED))
def test_each_refused_archive_leaves_nothing_behind(
    client: ExecutorClient, group: str, shape: str
) -> None:
    trajectory = f"refused-{shape.replace(' ', '-')}"
    sh(client, trajectory, "mkdir kept && echo 1 > kept/file", group=group)
    status, archive = REFUSED[shape]
    with pytest.raises(ExecutorError) as refused:
        client.upload_archive(trajectory, archive, path="kept")
    assert refused.value.status == status, refused.value.message
    assert files_of(client, trajectory) == ["kept", "kept/file"]
    assert sh(client, trajectory, "ls -A /tmp | grep -c atropos || true") == "0"


def test_a_chunked_body_over_the_cap_is_refused_as_it_arrives(
    server: ExecutorServer, group: str
) -> None:
    def body() -> Iterator[bytes]:  # 3 MiB without a Content-Length
        for _ in range(48):
            yield os.urandom(64 * 1024)

    response = server.client.put(
        "/trajectories/chunked-1/archive",
        params={"group": group},
        content=body(),
        headers={"Content-Type": "application/gzip"},
    )
    assert response.status_code == 413, response.text
    assert "exceeds the 2097152-byte limit" in response.json()["error"]
    listing = server.client.post("/artifacts/list", json={"trajectory_id": "chunked-1"})
    assert listing.json()["entries"] == []


# --------------------------------------------------------------------------- templates


@pytest.fixture
def template(client: ExecutorClient, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A template of ``make_repo``'s tree under a name of the test's own."""
    name = f"repo-{request.node.name}"[:200]
    info = client.create_template(name, local_path=make_repo(tmp_path / "template"))
    assert info.entry_count == 6 and len(info.sha256) == 64
    return name


def shipped(client: ExecutorClient) -> dict[str, int]:
    workspaces = client.status().model_dump()["workspaces"]
    return dict(workspaces["layers_sent_by_sandbox"])


def test_sixteen_trajectories_from_a_template_see_only_their_own_files(
    server: ExecutorServer, client: ExecutorClient, group: str, template: str
) -> None:
    before = shipped(client)
    names = [f"grpo-{i}" for i in range(2 * SLOTS)]
    lease = LeaseOptions(group=group, template=template)
    with ThreadPoolExecutor(len(names)) as threads:
        opened = list(threads.map(lambda t: client.open_trajectory(t, lease), names))
    assert all(info.template == template for info in opened)
    by_sandbox = {str(info.sandbox_id) for info in opened}
    assert len(by_sandbox) == 2  # eight on each sandbox

    with ThreadPoolExecutor(len(names)) as threads:
        list(threads.map(lambda t: sh(client, t, f"echo {t} > own-{t}.txt"), names))
    for name in names:
        own = [path for path in files_of(client, name) if path.startswith("own-")]
        assert own == [f"own-{name}.txt"], (name, own)
        assert sh(client, name, "cat src/pkg/mod.py") == "VALUE = 1"

    # The template reached each sandbox once, however many of its slots asked at once.
    after = shipped(client)
    assert {s: after.get(s, 0) - before.get(s, 0) for s in by_sandbox} == dict.fromkeys(
        by_sandbox, 1
    )
    layer = f"sha256-{next(t for t in client.list_templates() if t.name == template).sha256}"
    pool = server.directory / "pool"
    assert sorted(p.parent.parent.name for p in pool.glob(f"sandbox-*/layers/{layer}")) == [
        "sandbox-0",
        "sandbox-1",
    ]


def test_a_template_for_a_trajectory_holding_another_workspace_is_refused(
    server: ExecutorServer, client: ExecutorClient, group: str, template: str
) -> None:
    sh(client, "plain-1", "true", group=group)  # an empty workspace
    with pytest.raises(ExecutorError) as conflict:
        client.open_trajectory("plain-1", LeaseOptions(template=template))
    assert conflict.value.status == 409
    assert "already holds a workspace that started empty" in conflict.value.message
    result = client.execute(
        "plain-1", "terminal", {"command": "true"}, lease=LeaseOptions(template=template)
    )
    assert not result.success and result.metadata["error_kind"] == "bad_request"
    with pytest.raises(ExecutorError) as by_upload:
        client.upload_archive("plain-1", tgz(file("x")), template=template)
    assert by_upload.value.status == 409

    client.open_trajectory("templated-1", LeaseOptions(group=group, template=template))
    # The same template again is the lease it holds: fine, and nothing is reset.
    sh(client, "templated-1", "echo mine > mine.txt", template=template)
    assert sh(client, "templated-1", "cat mine.txt", template=template) == "mine"
    with pytest.raises(ExecutorError) as unknown:
        client.open_trajectory("templated-2", LeaseOptions(group=group, template="no-such"))
    assert unknown.value.status == 404 and "unknown template 'no-such'" in unknown.value.message
    trajectories = server.client.get("/trajectories", params={"group": group}).json()
    assert {t["trajectory_id"] for t in trajectories["trajectories"]} == {
        "plain-1",
        "templated-1",
    }


def test_a_deleted_templates_running_trajectories_keep_working(
    client: ExecutorClient, group: str, template: str
) -> None:
    sh(client, "kept-1", "echo more >> src/pkg/mod.py", group=group, template=template)
    client.delete_template(template)
    assert template not in {t.name for t in client.list_templates()}
    assert (
        sh(client, "kept-1", "cat src/pkg/mod.py; ls")
        == "VALUE = 1\nmore\nlink\nrun.sh\nsecret.txt\nsrc"
    )
    forks = client.fork("kept-1", ["kept-2", "kept-3"]).forks
    assert sh(client, "kept-2", "cat src/pkg/mod.py") == "VALUE = 1\nmore"
    assert len(forks) == 2
    with pytest.raises(ExecutorError) as gone:
        client.open_trajectory("kept-4", LeaseOptions(group=group, template=template))
    assert gone.value.status == 404


def test_a_template_from_a_live_trajectory(client: ExecutorClient, group: str) -> None:
    sh(client, "live-1", "mkdir -p a/b && echo state > a/b/c && ln -s a/b/c c", group=group)
    info = client.create_template(f"from-live-{group}", trajectory_id="live-1")
    assert info.entry_count >= 4
    lease = LeaseOptions(group=group, template=info.name)
    assert sh(client, "live-2", "cat c; readlink c", **lease.model_dump()) == "state\na/b/c"
    sh(client, "live-1", "echo later > a/b/c")  # the template is what was there then
    assert sh(client, "live-2", "cat a/b/c") == "state"
    client.delete_template(info.name)


# --------------------------------------------------------------------------- forks and diffs


def test_a_fork_of_a_live_trajectory_starts_from_its_files_and_is_independent(
    server: ExecutorServer, client: ExecutorClient, group: str, template: str
) -> None:
    sh(
        client,
        "src-1",
        "echo edited > src/pkg/mod.py && rm secret.txt && mkdir new && echo n > new/file",
        group=group,
        template=template,
    )
    job = client.execute("src-1", "background_run", {"command": "sleep 60"})
    assert job.success
    answer = client.fork("src-1", ["fork-1", "fork-2", "fork-3"])
    assert [f.trajectory_id for f in answer.forks] == ["fork-1", "fork-2", "fork-3"]
    for fork in ["fork-1", "fork-2", "fork-3"]:
        assert files_of(client, fork) == files_of(client, "src-1")
        assert sh(client, fork, "cat src/pkg/mod.py new/file") == "edited\nn"
        sh(client, fork, f"echo {fork} > mine.txt && rm run.sh")
    # Processes are not copied: the source's job is not the forks'.
    jobs = client.execute("fork-1", "check_background", {})
    assert jobs.metadata["jobs"] == []
    assert sh(client, "src-1", "ls mine.txt run.sh 2>&1 || true").endswith("run.sh")
    for fork in ["fork-1", "fork-2", "fork-3"]:
        assert sh(client, fork, "cat mine.txt") == fork
    entries = server.client.get("/trajectories", params={"group": group}).json()["trajectories"]
    forked = {t["trajectory_id"]: t["forked_from"] for t in entries}
    assert forked == {"src-1": None, "fork-1": "src-1", "fork-2": "src-1", "fork-3": "src-1"}


def test_a_fork_across_sandboxes_and_a_fork_that_fails_takes_nothing(
    server: ExecutorServer, client: ExecutorClient, group: str
) -> None:
    sh(client, "wide-0", "echo base > base.txt", group=group)
    names = [f"wide-{i}" for i in range(1, 2 * SLOTS)]  # the fifteen other slots
    # One slot short: the fifteen leases taken go back. (Sent once: the client would retry
    # a 503 that ran nothing.)
    body = {"trajectory_id": "wide-0", "new_trajectory_ids": [*names, "one-too-many"]}
    refused = server.client.post("/fork", json=body)
    assert refused.status_code == 503 and "no free slot" in refused.json()["error"]
    listed = server.client.get("/trajectories", params={"group": group}).json()
    assert [t["trajectory_id"] for t in listed["trajectories"]] == ["wide-0"]
    assert client.status().pool["leased_slots"] == 1
    # The slots it took are reset before they are free again (in the background).
    wait_for(lambda: client.status().pool["free_slots"] == len(names), 30, "the resets")

    forks = client.fork("wide-0", names).forks
    assert len({fork.sandbox_id for fork in forks}) == 2  # seven beside it, eight elsewhere
    with ThreadPoolExecutor(len(names)) as threads:
        seen = list(threads.map(lambda t: sh(client, t, "cat base.txt"), names))
    assert seen == ["base"] * len(names)
    with pytest.raises(ExecutorError) as taken:
        client.fork("wide-0", ["wide-1"])
    assert taken.value.status == 409 and "already holds a lease" in taken.value.message


def test_diff_holds_exactly_what_changed(
    client: ExecutorClient, group: str, template: str, tmp_path: Path
) -> None:
    sh(
        client,
        "diff-1",
        "echo changed > src/pkg/mod.py && rm secret.txt && mkdir -p out/deep "
        "&& echo r > out/deep/result.txt && ln -s out/deep/result.txt result",
        group=group,
        template=template,
    )
    diff = client.diff("diff-1", tmp_path / "diff")
    assert diff.success and diff.deleted == ["secret.txt"]
    found = sorted(str(p.relative_to(tmp_path / "diff")) for p in (tmp_path / "diff").rglob("*"))
    assert found == [
        "out",
        "out/deep",
        "out/deep/result.txt",
        "result",
        "src",
        "src/pkg",
        "src/pkg/mod.py",
    ]
    assert (tmp_path / "diff" / "src/pkg/mod.py").read_text() == "changed\n"
    assert os.readlink(tmp_path / "diff" / "result") == "out/deep/result.txt"
    assert not (tmp_path / "diff" / "run.sh").exists()  # unchanged: not in the diff
    assert set(diff.changed) >= {"src/pkg/mod.py", "out/deep/result.txt", "result"}

    forked = client.fork("diff-1", ["diff-2"]).forks
    assert forked
    sh(client, "diff-2", "echo fork > fork.txt && rm run.sh")
    fork_diff = client.diff("diff-2", tmp_path / "fork-diff")
    assert fork_diff.deleted == ["run.sh"]
    assert [p.name for p in (tmp_path / "fork-diff").iterdir()] == ["fork.txt"]


def test_the_async_client_uploads_forks_and_diffs(
    server: ExecutorServer, group: str, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    name = f"async/{group}"  # a name with a slash: quoted in the URL by the client

    async def scenario() -> tuple[list[str], list[str]]:
        async with AsyncExecutorClient(server.url, token=server.token) as client:
            await client.create_template(name, local_path=repo)
            lease = LeaseOptions(group=group)
            await client.upload_dir("async-1", repo, template=name, lease=lease)
            await client.fork("async-1", ["async-2"])
            await client.execute("async-2", "write_file", {"path": "x.txt", "content": "x"})
            diff = await client.diff("async-2", tmp_path / "out")
            await client.delete_template(name)
            names = [t.name for t in await client.list_templates()]
            return diff.changed, names

    changed, names = asyncio.run(scenario())
    assert changed == ["x.txt"] and name not in names
    assert (tmp_path / "out" / "x.txt").read_text() == "x"


# --------------------------------------------------------------------------- restarts


def test_templates_survive_an_executor_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port_env = settings(slots="2", max_containers="1")
    first = start_executor(env=port_env, state_dir=state)
    port = first.port
    try:
        with ExecutorClient(first.url, token=first.token) as client:
            created = client.create_template("kept", local_path=make_repo(tmp_path / "repo"))
    finally:
        first.stop()
    second = start_executor(env=port_env, state_dir=state, port=port)
    try:
        with ExecutorClient(second.url, token=second.token) as client:
            assert [t.model_dump() for t in client.list_templates()] == [created.model_dump()]
            sh(client, "after-restart", "true", template="kept")
            assert sh(client, "after-restart", "cat src/pkg/mod.py") == "VALUE = 1"
    finally:
        second.stop()
    templates_dir = state / f"templates-local-{port}"
    assert sorted(p.name for p in templates_dir.iterdir()) == [
        f"{created.sha256}.tar.gz",
        "index.json",
    ]
    assert stat.S_IMODE(templates_dir.stat().st_mode) == 0o700


def test_in_copy_mode_the_same_operations_work_and_health_says_so(tmp_path: Path) -> None:
    """Where the kernel refuses copy-on-write, sandboxes copy: slower, the same answers."""
    copying = start_executor(
        env=settings(slots="3", max_containers="1", sandbox_workspace_layers="copy")
    )
    try:
        assert copying.client.get("/health").json()["workspace_layers"] == "copy"
        with ExecutorClient(copying.url, token=copying.token) as client:
            client.create_template("repo", local_path=make_repo(tmp_path / "repo"))
            sh(client, "copy-1", "echo changed > src/pkg/mod.py && rm link", template="repo")
            client.fork("copy-1", ["copy-2"])
            sh(client, "copy-2", "echo new > new.txt")
            assert sh(client, "copy-1", "ls") == "run.sh\nsecret.txt\nsrc"
            diff = client.diff("copy-2", tmp_path / "diff")
            assert diff.deleted == [] and diff.changed == ["new.txt"]
            whole = client.diff("copy-1")
            assert whole.deleted == ["link"] and whole.changed == ["src/pkg/mod.py"]
    finally:
        copying.stop()
