"""HTTP behaviour of the real sandbox server: errors, auth, body limit, startup, order, reset."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from atropos_agent import __version__
from atropos_agent.sandbox.protocol import PROTOCOL_VERSION
from harness.processes import host_processes_matching
from harness.servers import TOKEN, SandboxServer, start_sandbox

Factory = Callable[..., SandboxServer]


def tiny_layer() -> bytes:
    """A layer archive of one file, for the layer routes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("auth-layer.txt")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    return buffer.getvalue()


AUTH_LAYER = tiny_layer()
AUTH_LAYER_ID = "sha256-" + hashlib.sha256(AUTH_LAYER).hexdigest()
# A valid request for every authenticated route: (method, path, JSON body).
ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/execute", {"slot_id": "slot_0", "tool": "terminal", "args": {"command": "true"}}),
    ("POST", "/batch", [{"slot_id": "slot_0", "tool": "terminal", "args": {"command": "true"}}]),
    (
        "POST",
        "/batch/stream",
        [{"slot_id": "slot_0", "tool": "terminal", "args": {"command": "true"}}],
    ),
    ("POST", "/execute/stream", {"slot_id": "slot_0", "tool": "terminal", "args": {}}),
    ("POST", "/reset", {"slot_id": "slot_2"}),
    ("POST", "/cancel", {"slot_id": "slot_2"}),
    ("POST", "/slots/owner", {"slot_id": "slot_2", "lease": None}),
    ("GET", "/slots", None),
    ("POST", "/artifacts/read", {"slot_id": "slot_0", "path": "auth.txt"}),
    ("POST", "/artifacts/list", {"slot_id": "slot_0", "path": "."}),
    ("POST", "/artifacts/archive", {"slot_id": "slot_0", "path": "."}),
    # A raw body (bytes, not JSON): one file.
    ("PUT", "/slots/slot_0/archive?format=file&path=auth-upload.txt", b"x"),
    # Workspaces made of layers: a layer's raw archive, the store, slots started on layers.
    ("PUT", f"/layers/{AUTH_LAYER_ID}", AUTH_LAYER),
    ("GET", "/layers", None),
    ("GET", f"/layers/{AUTH_LAYER_ID}", None),
    ("DELETE", f"/layers/{AUTH_LAYER_ID}", None),
    ("POST", "/slots/slot_0/workspace", {"layers": []}),
    ("POST", "/slots/slot_0/fork", {"targets": []}),
    ("GET", "/slots/slot_0/export", None),
    ("GET", "/slots/slot_0/diff", None),
    ("GET", "/metrics", None),
]
ROUTE_IDS = [path for _, path, _ in ROUTES]
# What the documented paths' parameters stand for in ROUTES.
PATH_PARAMETERS = {"{slot_id}": "slot_0", "{layer_id}": AUTH_LAYER_ID}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def exists(sandbox: SandboxServer, slot: str, path: str) -> bool:
    result = sandbox.sh(slot, f"test -e {path} && echo yes || echo no")
    assert result["success"], result
    return bool(result["output"].strip() == "yes")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# --------------------------------------------------------------------------- request errors


@pytest.mark.parametrize("route", ["/execute", "/batch", "/reset", "/artifacts/read"])
def test_malformed_json_is_400(sandbox: SandboxServer, route: str) -> None:
    response = sandbox.client.post(
        route, content=b'{"slot_id": "slot_0", ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "malformed JSON" in response.json()["error"]


def test_body_without_json_content_type_is_parsed_as_json(sandbox: SandboxServer) -> None:
    # `curl -d` sends a form content type; the body is JSON all the same.
    body = b'{"slot_id": "slot_0", "tool": "terminal", "args": {"command": "echo form"}}'
    response = sandbox.client.post(
        "/execute", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["output"].strip() == "form"


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/batch", {"slot_id": "slot_0", "tool": "terminal"}, "list of objects"),
        ("/execute", [{"slot_id": "slot_0", "tool": "terminal"}], "JSON object"),
        ("/reset", {}, "slot_id"),
        ("/artifacts/read", {"slot_id": "slot_0"}, "path"),
    ],
)
def test_wrong_shape_is_422(sandbox: SandboxServer, route: str, body: Any, field: str) -> None:
    response = sandbox.client.post(route, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("invalid request")
    assert field in error


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"tool": "terminal"}, "Invalid item: slot_id: Field required"),
        (
            {"slot_id": "slot_0", "tool": "terminal", "timeout": -1},
            "Invalid item: timeout: Input should be greater than 0",
        ),
        (
            {"slot_id": "slot_9", "tool": "terminal", "args": {"command": "true"}},
            "Unknown slot: slot_9 (this sandbox has slot_0..slot_3)",
        ),
        ({"slot_id": "slot_0", "tool": "rm_rf_everything", "args": {}}, "Unknown tool: rm_rf"),
    ],
)
def test_execute_item_problem_is_a_failed_result(
    sandbox: SandboxServer, body: Any, error: str
) -> None:
    # The old containers' behaviour: a 200 with success false, never an HTTP error.
    response = sandbox.client.post("/execute", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["success"] is False
    assert result["error"].startswith(error), result


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/reset", {"slot_id": "slot_9"}),
        ("/cancel", {"slot_id": "slot_9"}),
        ("/slots/owner", {"slot_id": "slot_9", "lease": {"trajectory_id": "t"}}),
        ("/artifacts/read", {"slot_id": "slot_9", "path": "x"}),
        ("/artifacts/list", {"slot_id": "nope"}),
    ],
)
def test_unknown_slot_is_404(sandbox: SandboxServer, route: str, body: Any) -> None:
    response = sandbox.client.post(route, json=body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert "unknown slot" in error
    assert "slot_0..slot_3" in error


@pytest.mark.parametrize(
    ("bad_item", "error"),
    [
        ({"slot_id": "slot_0", "tool": "no_such_tool", "args": {}}, "Unknown tool: no_such_tool"),
        (
            {"slot_id": "slot_42", "tool": "terminal", "args": {"command": "true"}},
            "Unknown slot: slot_42",
        ),
    ],
)
def test_batch_with_one_bad_item_runs_the_others(
    sandbox: SandboxServer, bad_item: Any, error: str
) -> None:
    marker = unique("marker")
    batch = [
        {"slot_id": "slot_0", "tool": "write_file", "args": {"path": marker, "content": "x"}},
        {"slot_id": "slot_1", "tool": "terminal", "args": {"command": f"touch {marker}"}},
        bad_item,
    ]
    response = sandbox.client.post("/batch", json=batch)
    assert response.status_code == 200, response.text
    results = response.json()
    assert [r["success"] for r in results] == [True, True, False], results
    assert results[2]["error"].startswith(error)
    assert exists(sandbox, "slot_0", marker)
    assert exists(sandbox, "slot_1", marker)


# --------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def anonymous(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    # The layer GET /layers/{layer_id} answers (the PUT of ROUTES may not have run).
    stored = sandbox.client.put(f"/layers/{AUTH_LAYER_ID}", content=AUTH_LAYER)
    assert stored.status_code == 200, stored.text
    with httpx.Client(base_url=sandbox.url, timeout=60) as client:
        yield client


def call(client: httpx.Client, method: str, path: str, body: Any, **headers: str) -> httpx.Response:
    if method in ("GET", "DELETE"):
        return client.request(method, path, headers=headers)
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers=headers)
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
def test_auth_missing_header_is_401(
    anonymous: httpx.Client, method: str, path: str, body: Any
) -> None:
    response = call(anonymous, method, path, body)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "bearer token" in response.json()["error"]


@pytest.mark.parametrize("header", ["Basic x", "Bearer", f"Basic {TOKEN}", f"Token {TOKEN}"])
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
def test_auth_malformed_header_is_401(
    anonymous: httpx.Client, method: str, path: str, body: Any, header: str
) -> None:
    response = call(anonymous, method, path, body, Authorization=header)
    assert response.status_code == 401, (header, response.text)
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "token", ["wrong-token", TOKEN + "x", TOKEN[:-1], TOKEN.upper()], ids=["other", "+", "-", "up"]
)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
def test_auth_wrong_token_is_403(
    anonymous: httpx.Client, method: str, path: str, body: Any, token: str
) -> None:
    response = call(anonymous, method, path, body, Authorization=f"Bearer {token}")
    assert response.status_code == 403, response.text
    assert "invalid bearer token" in response.json()["error"]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
def test_auth_correct_token_is_200(
    anonymous: httpx.Client, method: str, path: str, body: Any
) -> None:
    for scheme in ("Bearer", "bearer"):
        response = call(anonymous, method, path, body, Authorization=f"{scheme} {TOKEN}")
        assert response.status_code == 200, (scheme, response.text)


def test_auth_rejected_call_does_not_run(sandbox: SandboxServer, anonymous: httpx.Client) -> None:
    marker = unique("noauth")
    item = {"slot_id": "slot_0", "tool": "write_file", "args": {"path": marker, "content": "x"}}
    assert anonymous.post("/execute", json=item).status_code == 401
    wrong = anonymous.post("/execute", json=item, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert not exists(sandbox, "slot_0", marker)


def test_auth_routes_cover_every_route(sandbox: SandboxServer) -> None:
    documented = set()
    for path in sandbox.client.get("/openapi.json").json()["paths"]:
        for parameter, value in PATH_PARAMETERS.items():
            path = path.replace(parameter, value)
        documented.add(path)
    assert documented == {path.partition("?")[0] for _, path, _ in ROUTES} | {"/health"}


def test_health_needs_no_token(anonymous: httpx.Client) -> None:
    assert anonymous.get("/health").status_code == 200
    wrong = anonymous.get("/health", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 200
    assert anonymous.get("/health", headers={"Authorization": "Basic x"}).status_code == 200


# --------------------------------------------------------------------------- health, slots


def test_health(sandbox: SandboxServer) -> None:
    health = httpx.get(sandbox.url + "/health").json()
    assert health["status"] == "ok"
    assert health["slots"] == 4
    assert health["busy_slots"] == 0
    assert health["isolation"] == "bwrap"
    assert health["version"] == __version__
    assert health["protocol_version"] == PROTOCOL_VERSION == 5
    assert health["uptime_s"] >= 0
    assert health["workspace_layers"] == "overlay"  # root, Linux >= 5.19: copy-on-write works


def test_slots_listing(sandbox: SandboxServer) -> None:
    # Free slots up to warm_slots (32 by default) start in the background, soon after health.
    def all_alive() -> bool:
        return all(slot["alive"] for slot in sandbox.client.get("/slots").json()["slots"])

    wait_for(all_alive, 10, "every slot warm")
    response = sandbox.client.get("/slots")
    assert response.status_code == 200
    slots = response.json()["slots"]
    assert [slot["slot_id"] for slot in slots] == ["slot_0", "slot_1", "slot_2", "slot_3"]
    for slot in slots:
        assert slot["alive"] is True
        assert slot["busy"] is False
        assert isinstance(slot["pid"], int)


def test_busy_slots_counted_while_a_call_runs(sandbox: SandboxServer) -> None:
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(sandbox.sh, "slot_1", "sleep 1")

        def busy() -> bool:
            return bool(httpx.get(sandbox.url + "/health").json()["busy_slots"] == 1)

        wait_for(busy, 5, "slot_1 to be busy")
        slots = {s["slot_id"]: s for s in sandbox.client.get("/slots").json()["slots"]}
        assert slots["slot_1"]["busy"] is True
        assert slots["slot_0"]["busy"] is False
        assert running.result()["success"]
    assert httpx.get(sandbox.url + "/health").json()["busy_slots"] == 0


# --------------------------------------------------------------------------- ordering


def test_batch_runs_in_order_within_a_slot(sandbox: SandboxServer) -> None:
    name = unique("order")
    items: list[dict[str, Any]] = [
        {
            "slot_id": "slot_0",
            "tool": "terminal",
            "args": {"command": f"echo {i} >> {name}"},
            "execution_id": f"e{i}",
        }
        for i in range(20)
    ]
    items.append({"slot_id": "slot_0", "tool": "read_file", "args": {"path": name}})
    response = sandbox.client.post("/batch", json=items)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 21
    assert [r["execution_id"] for r in results[:20]] == [f"e{i}" for i in range(20)]
    assert all(r["success"] for r in results), results
    assert all(r["metadata"]["slot_id"] == "slot_0" for r in results)
    assert results[20]["output"].split() == [str(i) for i in range(20)]


def test_batch_results_follow_request_order_across_slots(sandbox: SandboxServer) -> None:
    items = [
        {"slot_id": f"slot_{i % 3}", "tool": "terminal", "args": {"command": f"echo {i}"}}
        for i in range(9)
    ]
    results = sandbox.client.post("/batch", json=items).json()
    assert [r["output"].strip() for r in results] == [str(i) for i in range(9)]
    assert [r["metadata"]["slot_id"] for r in results] == [f"slot_{i % 3}" for i in range(9)]


def timed_batch(sandbox: SandboxServer, items: list[dict[str, Any]]) -> float:
    started = time.monotonic()
    with httpx.Client(base_url=sandbox.url, headers=sandbox.client.headers, timeout=60) as c:
        response = c.post("/batch", json=items)
    assert response.status_code == 200, response.text
    assert all(r["success"] for r in response.json()), response.text
    return time.monotonic() - started


def sleep_item(slot: str, seconds: float) -> dict[str, Any]:
    return {"slot_id": slot, "tool": "terminal", "args": {"command": f"sleep {seconds}"}}


def test_different_slots_run_in_parallel(sandbox: SandboxServer) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        durations = list(
            pool.map(lambda slot: timed_batch(sandbox, [sleep_item(slot, 1)]), ["slot_1", "slot_2"])
        )
    elapsed = time.monotonic() - started
    assert all(d >= 1.0 for d in durations), durations
    assert elapsed < 1.8, elapsed


def test_one_batch_over_two_slots_runs_them_in_parallel(sandbox: SandboxServer) -> None:
    elapsed = timed_batch(sandbox, [sleep_item("slot_1", 1), sleep_item("slot_2", 1)])
    assert 1.0 <= elapsed < 1.8


def test_same_slot_calls_are_serialised(sandbox: SandboxServer) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: timed_batch(sandbox, [sleep_item("slot_1", 0.6)]), range(2)))
    assert time.monotonic() - started >= 1.2


def test_busy_slot_does_not_delay_another(sandbox: SandboxServer) -> None:
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(sandbox.sh, "slot_0", "sleep 2")

        def slot_0_busy() -> bool:
            slots = sandbox.client.get("/slots").json()["slots"]
            return bool(slots[0]["busy"])

        wait_for(slot_0_busy, 5, "slot_0 to be busy")
        quick_start = time.monotonic()
        quick = sandbox.sh("slot_1", "echo quick")
        quick_elapsed = time.monotonic() - quick_start
        assert quick["output"].strip() == "quick"
        assert quick_elapsed < 1.0, quick_elapsed
        assert not slow.done()
        assert slow.result()["success"]
        assert time.monotonic() - started >= 2.0


# --------------------------------------------------------------------------- reset


def test_reset_wipes_files_and_kills_processes(sandbox: SandboxServer) -> None:
    slot = "slot_3"
    assert sandbox.run(slot, "write_file", path="keep/me.txt", content="data")["success"]
    assert sandbox.sh(slot, "echo t > /tmp/scratch.txt")["success"]
    started = sandbox.sh(slot, "nohup sleep 7501 >/dev/null 2>&1 &")
    assert started["success"], started
    # A process in another slot must survive this slot's reset.
    assert sandbox.sh("slot_2", "nohup sleep 7502 >/dev/null 2>&1 &")["success"]
    wait_for(lambda: bool(host_processes_matching("sleep 7501")), 5, "sleep 7501 to run")
    wait_for(lambda: bool(host_processes_matching("sleep 7502")), 5, "sleep 7502 to run")

    response = sandbox.client.post("/reset", json={"slot_id": slot})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "output": f"Reset workspace for {slot}",
        "error": "",
        "metadata": {},
        "status": "ok",
        "slot_id": slot,
    }

    assert host_processes_matching("sleep 7501") == []
    assert host_processes_matching("sleep 7502") != []
    listing = sandbox.client.post("/artifacts/list", json={"slot_id": slot}).json()
    assert listing["success"] is True
    assert listing["entries"] == []
    after = sandbox.sh(slot, "ls -A /workspace /tmp; echo alive")
    assert after["success"], after
    assert after["output"].split() == ["/tmp:", "/workspace:", "alive"]

    assert sandbox.client.post("/reset", json={"slot_id": "slot_2"}).status_code == 200
    assert host_processes_matching("sleep 7502") == []


# --------------------------------------------------------------------------- body limit


@pytest.fixture(scope="module")
def small_limit() -> Iterator[SandboxServer]:
    server = start_sandbox(slots=1, args=["--max-request-bytes", "100000"])
    yield server
    server.stop()


def write_item(content: str, path: str = "big.txt") -> bytes:
    return httpx.Request(
        "POST",
        "http://x/execute",
        json={
            "slot_id": "slot_0",
            "tool": "write_file",
            "args": {"path": path, "content": content},
        },
    ).content


def chunks(body: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    answer = response.json()
    assert "100000" in answer["error"]
    assert answer["limit"] == 100000


def test_oversize_body_with_content_length_is_413(small_limit: SandboxServer) -> None:
    body = write_item("x" * 150_000)
    response = small_limit.client.post(
        "/execute", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["Content-Length"] == str(len(body))
    assert_413(response)
    assert small_limit.sh("slot_0", "echo still here")["output"].strip() == "still here"
    assert not exists(small_limit, "slot_0", "big.txt")


def test_oversize_chunked_body_is_413(small_limit: SandboxServer) -> None:
    body = write_item("y" * 150_000)
    response = small_limit.client.post(
        "/execute", content=chunks(body), headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.request.headers
    assert_413(response)
    assert small_limit.sh("slot_0", "echo still here")["output"].strip() == "still here"
    assert not exists(small_limit, "slot_0", "big.txt")


def test_chunked_body_under_the_limit_is_served(small_limit: SandboxServer) -> None:
    body = write_item("z" * 60_000, path="fits.txt")
    response = small_limit.client.post(
        "/execute", content=chunks(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True
    read = small_limit.run("slot_0", "read_file", path="fits.txt")
    assert read["output"] == "z" * 60_000


def test_oversize_repeatedly_then_normal(small_limit: SandboxServer) -> None:
    body = write_item("w" * 400_000)
    for _ in range(3):
        assert_413(small_limit.client.post("/execute", content=body))
        assert_413(small_limit.client.post("/execute", content=chunks(body)))
    assert httpx.get(small_limit.url + "/health").status_code == 200
    assert small_limit.sh("slot_0", "echo ok")["output"].strip() == "ok"


# --------------------------------------------------------------------------- startup


def finished(server: SandboxServer, within_s: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        code = server.process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {within_s}s:\n{server.log()}")
    return code, server.log(), time.monotonic() - started


def test_refuses_to_start_without_bwrap(sandbox_factory: Factory) -> None:
    server = sandbox_factory(env={"PATH": "/nonexistent"}, wait=False)
    code, log, elapsed = finished(server, 15)
    assert code != 0, log
    assert elapsed < 10, elapsed
    assert "bubblewrap" in log
    assert "apt-get install bubblewrap" in log
    assert "--isolation none" in log
    assert "Traceback" not in log


def test_isolation_none_starts_without_bwrap(sandbox_factory: Factory) -> None:
    # Slot uids of its own: isolation "none" kills every process of its slots' uids on stop.
    uid_base = str(5_000_000 + (os.getpid() % 20_000) * 64)
    server = sandbox_factory(
        env={"PATH": "/nonexistent"},
        args=["--isolation", "none", "--slot-uid-base", uid_base],
        slots=2,
    )
    assert httpx.get(server.url + "/health").json()["isolation"] == "none"
    result = server.sh("slot_1", "echo unsandboxed")
    assert result["success"], result
    assert result["output"].strip() == "unsandboxed"
    # Without bubblewrap the command runs in the workspace's host directory.
    where = server.sh("slot_1", "pwd")["output"].strip()
    assert where == str(server.data_dir.resolve() / "slots" / "slot_1" / "workspace")
    server.stop()
    assert server.process.returncode is not None


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"slots": 0}, "slots"),
        ({"env": {"ATROPOS_SANDBOX_ISOLATION": "bogus"}}, "isolation"),
        ({"args": ["--isolation", "firejail"]}, "isolation"),
        ({"args": ["--max-request-bytes", "10"]}, "max_request_bytes"),
    ],
)
def test_invalid_setting_refused(sandbox_factory: Factory, kwargs: Any, setting: str) -> None:
    server = sandbox_factory(wait=False, **kwargs)
    code, log, elapsed = finished(server, 15)
    assert code != 0, log
    assert elapsed < 10, elapsed
    assert "invalid setting" in log
    assert f"ATROPOS_SANDBOX_{setting.upper()}" in log, log
    assert "Traceback" not in log
