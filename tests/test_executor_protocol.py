"""The executor's wire contract (/work/shared/PROTOCOL.md) against a real executor: auth on
every route, an old trainer's raw requests, artifacts, /tools, /trajectories, bad input, and
invalid settings."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.servers import ExecutorServer, free_port, start_executor
from tests.executor_support import release, settings

# Every authenticated route with a request it would accept: (method, path, JSON body).
AUTH_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/status", None),
    ("GET", "/tools", None),
    ("GET", "/trajectories", None),
    (
        "POST",
        "/execute",
        {"trajectory_id": "auth", "tool": {"name": "terminal", "arguments": {"command": "true"}}},
    ),
    (
        "POST",
        "/execute_batch",
        {"calls": [{"trajectory_id": "auth", "tool": {"name": "terminal", "arguments": {}}}]},
    ),
    ("POST", "/release", {"trajectory_id": "auth"}),
    ("POST", "/artifacts/read", {"trajectory_id": "auth", "path": "x"}),
    ("POST", "/artifacts/list", {"trajectory_id": "auth"}),
    ("POST", "/artifacts/archive", {"trajectory_id": "auth"}),
]


@pytest.fixture(scope="module")
def executor() -> Iterator[ExecutorServer]:
    """The shared executor of this module: 1..2 sandboxes of 4 slots."""
    server = start_executor(env=settings())
    yield server
    server.stop()


def raw_post(server: ExecutorServer, path: str, body: dict[str, Any]) -> httpx.Response:
    """A POST as an old trainer sends it: hand-made JSON and a bearer header, nothing else."""
    return httpx.post(
        server.url + path,
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.token}"},
        timeout=60,
    )


# ---- auth


@pytest.mark.parametrize(("method", "path", "body"), AUTH_ROUTES, ids=[r[1] for r in AUTH_ROUTES])
def test_every_route_requires_the_token(
    executor: ExecutorServer, method: str, path: str, body: Any
) -> None:
    requests_before = executor.status()["total_requests"]
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer wrong-token"}, 403),
        ({"Authorization": f"Bearer {executor.token}x"}, 403),
    ):
        response = httpx.request(method, executor.url + path, json=body, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert response.json()["error"], response.text
    # Nothing was run for the refused requests.
    assert executor.status()["total_requests"] == requests_before
    # The right token gets through (the request itself may still be refused for its content).
    response = executor.client.request(method, path, json=body)
    assert response.status_code not in (401, 403), response.text
    release(executor, "auth")


@pytest.mark.parametrize("path", ["/", "/health"])
def test_root_and_health_are_open(executor: ExecutorServer, path: str) -> None:
    response = httpx.get(executor.url + path)
    assert response.status_code == 200, response.text
    if path == "/health":
        assert response.json()["status"] == "ok"


# ---- an existing trainer's requests, byte for byte as documented


def test_old_trainer_execute_and_release(executor: ExecutorServer) -> None:
    trajectory = "old-trainer"
    body = {
        "trajectory_id": trajectory,
        "tool": {
            "name": "terminal",
            "arguments": {"command": "echo hello > greeting.txt; cat greeting.txt"},
            "uniq_id": "call-0001",
        },
        "timeout_s": 30,
    }
    response = raw_post(executor, "/execute", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) >= {"success", "output", "error", "metadata", "uniq_id"}
    assert result["success"] is True
    assert result["output"] == "hello"
    assert result["error"] == ""
    assert isinstance(result["metadata"], dict)
    assert result["uniq_id"] == "call-0001"

    # No uniq_id: one is generated, a new one per call.
    body = {
        "trajectory_id": trajectory,
        "tool": {"name": "terminal", "arguments": {"command": "pwd"}},
    }
    first, second = (raw_post(executor, "/execute", body).json() for _ in range(2))
    assert first["success"] and first["output"] == "/workspace", first
    assert isinstance(first["uniq_id"], str) and first["uniq_id"]
    assert first["uniq_id"] != second["uniq_id"]

    # A failed command is still HTTP 200, success false.
    body = {
        "trajectory_id": trajectory,
        "tool": {"name": "terminal", "arguments": {"command": "exit 3"}},
    }
    response = raw_post(executor, "/execute", body)
    assert response.status_code == 200
    assert response.json()["success"] is False
    assert response.json()["metadata"]["exit_code"] == 3

    response = raw_post(executor, "/release", {"trajectory_id": trajectory})
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_arguments_timeout_applies_without_timeout_s(executor: ExecutorServer) -> None:
    trajectory = "old-timeout"
    body = {
        "trajectory_id": trajectory,
        "tool": {
            "name": "terminal",
            "arguments": {"command": "sleep 20; echo late", "timeout": 1},
            "uniq_id": "t-1",
        },
    }
    started = time.monotonic()
    result = raw_post(executor, "/execute", body).json()
    elapsed = time.monotonic() - started
    assert result["success"] is False
    assert result["metadata"]["timed_out"] is True
    assert "timed out" in result["error"]
    assert result["uniq_id"] == "t-1"
    assert elapsed < 8, f"arguments.timeout=1 was not applied: {elapsed:.1f}s"
    release(executor, trajectory)


def test_old_trainer_artifacts(executor: ExecutorServer) -> None:
    trajectory = "old-artifacts"
    content = "line one\nline two\n"
    setup = executor.sh(
        trajectory, f"mkdir -p out/sub && printf '{content}' > out/report.txt && echo x > out/sub/y"
    )
    assert setup["success"], setup

    read = raw_post(
        executor, "/artifacts/read", {"trajectory_id": trajectory, "path": "out/report.txt"}
    ).json()
    old_keys = {
        "success",
        "content",
        "error",
        "encoding",
        "truncated",
        "bytes",
        "file_size",
        "path",
        "mime",
        "sha256",
    }
    assert set(read) - old_keys == {"file_sha256"}, "the old keys, and ours beside them"
    assert read["success"] is True
    assert read["content"] == content
    assert read["encoding"] == "text"
    assert read["truncated"] is False
    assert read["bytes"] == read["file_size"] == len(content)
    assert read["path"] == "out/report.txt"
    assert read["sha256"] is None
    assert read["error"] == ""

    read = raw_post(
        executor,
        "/artifacts/read",
        {
            "trajectory_id": trajectory,
            "path": "/workspace/out/report.txt",
            "encoding": "base64",
            "max_bytes": 4,
            "include_sha256": True,
        },
    ).json()
    assert read["success"] is True
    assert read["encoding"] == "base64"
    assert base64.b64decode(read["content"]) == content.encode()[:4]
    assert read["truncated"] is True
    assert read["bytes"] == 4 and read["file_size"] == len(content)
    # As the old service did: the hash of the bytes returned; the whole file's beside it.
    assert read["sha256"] == hashlib.sha256(content.encode()[:4]).hexdigest()
    assert read["file_sha256"] == hashlib.sha256(content.encode()).hexdigest()

    missing = raw_post(
        executor, "/artifacts/read", {"trajectory_id": trajectory, "path": "nope.txt"}
    ).json()
    assert missing["success"] is False and missing["error"]

    listing = raw_post(executor, "/artifacts/list", {"trajectory_id": trajectory}).json()
    assert set(listing) == {"success", "entries", "truncated", "error"}
    assert listing["success"] is True and listing["truncated"] is False
    assert [e["path"] for e in listing["entries"]] == ["out"]
    entry = listing["entries"][0]
    assert set(entry) == {"path", "is_dir", "size", "mtime"}
    assert entry["is_dir"] is True

    listing = raw_post(
        executor, "/artifacts/list", {"trajectory_id": trajectory, "path": "out", "recursive": True}
    ).json()
    paths = {e["path"]: e for e in listing["entries"]}
    assert {"out/report.txt", "out/sub", "out/sub/y"} <= set(paths)
    assert paths["out/report.txt"]["size"] == len(content)
    assert paths["out/report.txt"]["is_dir"] is False

    listing = raw_post(
        executor,
        "/artifacts/list",
        {"trajectory_id": trajectory, "path": "out", "recursive": True, "max_entries": 1},
    ).json()
    assert len(listing["entries"]) == 1 and listing["truncated"] is True

    for fmt in (None, "tgz"):
        body: dict[str, Any] = {"trajectory_id": trajectory}
        if fmt:
            body["format"] = fmt
        archive = raw_post(executor, "/artifacts/archive", body).json()
        old_keys = {"success", "content", "error", "encoding", "format", "bytes", "entry_count"}
        assert set(archive) - old_keys == {"truncated"}, "the old keys, and ours beside them"
        assert archive["success"] is True, archive
        assert archive["encoding"] == "base64" and archive["format"] == "tar.gz"
        data = base64.b64decode(archive["content"])
        assert archive["bytes"] == len(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
            member = next(m for m in tar.getmembers() if m.name.endswith("out/report.txt"))
            extracted = tar.extractfile(member)
            assert extracted is not None and extracted.read() == content.encode()
        assert {"out/report.txt", "out/sub/y"} <= names
        assert archive["entry_count"] >= 2

    # Artifacts of a trajectory that holds no slot: HTTP 200 in the route's shape, as the old
    # service answered.
    for route in ("read", "list", "archive"):
        body = {"trajectory_id": "no-such-trajectory", "path": "x"}
        response = raw_post(executor, f"/artifacts/{route}", body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["success"] is False
        assert answer["error"].startswith("No active slot for trajectory 'no-such-trajectory'")
    release(executor, trajectory)


def test_root_and_status_shapes(executor: ExecutorServer) -> None:
    root = httpx.get(executor.url + "/").json()
    assert isinstance(root["message"], str) and root["message"]
    before = executor.status()
    executor.sh("status-shape", "true")
    executor.call("status-shape", "no_such_tool")
    status = executor.status()
    assert isinstance(status["queue_size"], int) and status["queue_size"] >= 0
    assert status["total_requests"] == before["total_requests"] + 2
    assert status["total_errors"] == before["total_errors"] + 1
    pool = status["pool"]
    assert pool["sandboxes"] >= 1
    assert pool["total_slots"] == 4 * pool["sandboxes"]
    assert pool["leased_slots"] >= 1
    release(executor, "status-shape")


# ---- /tools, /trajectories, bad input


def test_tools_lists_sandbox_tool_schemas(executor: ExecutorServer) -> None:
    response = executor.client.get("/tools")
    assert response.status_code == 200
    tools = {tool["function"]["name"]: tool for tool in response.json()["tools"]}
    assert {"terminal", "read_file", "write_file", "terminal_stateful"} <= set(tools)
    for tool in tools.values():
        assert tool["type"] == "function"
        assert tool["function"]["description"]
        assert tool["function"]["parameters"]["type"] == "object"
    terminal = tools["terminal"]["function"]["parameters"]
    assert "command" in terminal["properties"] and terminal["required"] == ["command"]
    write = tools["write_file"]["function"]["parameters"]
    assert set(write["required"]) == {"path", "content"}
    # Every listed tool is one the executor actually runs.
    written = executor.call("tools-check", "write_file", path="t.txt", content="hi")
    assert written["success"], written
    read = executor.call("tools-check", "read_file", path="t.txt")
    assert read["success"] and read["output"] == "hi", read
    release(executor, "tools-check")


def test_trajectories_lists_leases_and_paginates(executor: ExecutorServer) -> None:
    names = ["list-a", "list-b", "list-c"]
    for count, name in enumerate(names, start=1):
        for _ in range(count):
            assert executor.sh(name, "true")["success"]
        time.sleep(0.05)
    try:
        listing = executor.client.get("/trajectories").json()
        assert listing["total"] == len(listing["trajectories"]) >= 3
        mine = {
            t["trajectory_id"]: t for t in listing["trajectories"] if t["trajectory_id"] in names
        }
        assert set(mine) == set(names)
        places = set()
        for count, name in enumerate(names, start=1):
            entry = mine[name]
            assert entry["calls"] == count
            assert entry["sandbox_id"] and entry["slot_id"]
            assert entry["age_s"] >= 0 and entry["idle_s"] >= 0
            assert entry["in_flight"] == 0
            places.add((entry["sandbox_id"], entry["slot_id"]))
        assert len(places) == 3
        assert mine["list-a"]["age_s"] >= mine["list-c"]["age_s"]

        pages: list[str] = []
        offset = 0
        while True:
            page = executor.client.get("/trajectories", params={"offset": offset, "limit": 2})
            assert page.status_code == 200
            body = page.json()
            assert body["offset"] == offset and body["limit"] == 2
            assert body["total"] == listing["total"]
            assert len(body["trajectories"]) <= 2
            if not body["trajectories"]:
                break
            pages.extend(t["trajectory_id"] for t in body["trajectories"])
            offset += 2
        assert pages == [t["trajectory_id"] for t in listing["trajectories"]]
        assert executor.client.get("/trajectories", params={"limit": 0}).status_code == 422
        assert executor.client.get("/trajectories", params={"offset": -1}).status_code == 422
    finally:
        release(executor, *names)
    remaining = executor.client.get("/trajectories").json()["trajectories"]
    assert not {t["trajectory_id"] for t in remaining} & set(names)


def test_malformed_json_is_400(executor: ExecutorServer) -> None:
    for path in ("/execute", "/execute_batch", "/release", "/artifacts/read"):
        response = executor.client.post(
            path, content=b'{"trajectory_id": "x", ', headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert "JSON" in response.json()["error"]
    # Well-formed JSON of the wrong shape is a 422 naming the field.
    response = executor.client.post("/execute", json={"trajectory_id": "x"})
    assert response.status_code == 422
    assert "tool" in response.json()["error"]


def test_unknown_tool_is_a_failed_result(executor: ExecutorServer) -> None:
    response = executor.client.post(
        "/execute",
        json={"trajectory_id": "unknown-tool", "tool": {"name": "launch_rockets", "uniq_id": "u"}},
    )
    assert response.status_code == 200
    result = response.json()
    assert result["success"] is False
    assert "launch_rockets" in result["error"]
    assert "terminal" in result["error"]  # and says what is available
    assert result["uniq_id"] == "u"
    # No slot was leased for it.
    response = executor.client.post("/release", json={"trajectory_id": "unknown-tool"})
    assert response.status_code == 404


# ---- invalid settings stop start-up


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"TOOL_EXECUTOR_MIN_CONTAINERS": "5", "TOOL_EXECUTOR_MAX_CONTAINERS": "2"},
            "min_containers",
        ),
        ({"TOOL_EXECUTOR_BATCH_WINDOW_MS": "abc"}, "tool_executor_batch_window_ms"),
        ({"TOOL_EXECUTOR_SLOTS": "0"}, "tool_executor_slots"),
    ],
    ids=["min-over-max", "batch-window-abc", "zero-slots"],
)
def test_invalid_setting_stops_startup(env: dict[str, str], named: str, tmp_path: Path) -> None:
    tmp = tmp_path
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
    full_env.update({"TOOL_EXECUTOR_SANDBOX_DATA_DIR": str(tmp / "pool"), **env})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "atropos_agent.cli", "serve", "--port", str(free_port())],
        env=full_env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    message = done.stderr + done.stdout
    assert "invalid setting" in message
    assert named in message.lower(), message
    assert time.monotonic() - started < 30
    assert not (tmp / "pool").exists(), "no sandbox should have been started"
