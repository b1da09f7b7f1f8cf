"""Hostile input, against the real executor and sandbox server: never a 5xx, never a run,
never a lost result, and the caller's keep-alive connection always lives on.

Every request body here is sent as the bytes a client would send (``json.dumps``, which
escapes a lone surrogate as ``\\ud800``), so what the servers see is what the wire carries.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atropos_agent.models import MAX_ARGUMENT_DEPTH, MAX_ID_CHARS, MAX_PATH_CHARS
from harness.servers import TOKEN, ExecutorServer, SandboxServer

JSON = {"Content-Type": "application/json"}
MARKER = "hardening-marker"
# Appends to the marker file: present afterwards only if a refused request ran after all.
MARK = f"echo ran >> {MARKER}"

# Values no request field may hold, by name (the test ids say which one failed).
LONE_SURROGATE = "a\ud800"
HOSTILE: dict[str, Any] = {
    "lone surrogate": LONE_SURROGATE,
    "NUL": "a\x00b",
    "100,000 chars": "x" * 100_000,
    "int": 7,
    "list": ["a"],
    "dict": {"a": 1},
    "null": None,
}
# Bodies that are not I-JSON whatever the route: refused with 400 before any parsing.
NOT_IJSON: dict[str, bytes] = {
    "invalid UTF-8": b'{"trajectory_id": "t\xff", "slot_id": "slot_0", "path": "a"}',
    "raw surrogate bytes": b'{"trajectory_id": "t\xed\xa0\x80", "slot_id": "s", "path": "a"}',
    "NaN": b'{"trajectory_id": "t", "slot_id": "slot_0", "path": "a", "max_bytes": NaN}',
    "-Infinity": b'{"trajectory_id": "t", "slot_id": "slot_0", "timeout_s": -Infinity}',
    "UTF-16": '{"trajectory_id": "t", "slot_id": "slot_0"}'.encode("utf-16-le"),
}


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


def with_value(body: Any, where: tuple[str | int, ...], value: Any) -> Any:
    """A copy of ``body`` with the field at ``where`` set to ``value``."""
    changed = copy.deepcopy(body)
    target = changed
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = value
    return changed


class CountingClient:
    """One keep-alive connection's client: counts the TCP connections it opened."""

    def __init__(self, url: str, token: str | None = TOKEN) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(
            base_url=url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=1)
        )
        self.connects = 0

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.connects += 1

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, path, extensions={"trace": self.trace}, **kwargs)

    def post(self, path: str, body: bytes) -> httpx.Response:
        return self.request("POST", path, content=body, headers=JSON)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def connection(executor: ExecutorServer) -> Iterator[CountingClient]:
    client = CountingClient(executor.url)
    yield client
    client.close()


def assert_refused(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text}"
    assert response.json()["error"], what
    assert response.headers.get("connection") != "close", what


def assert_alive(client: CountingClient, what: str) -> None:
    """The next valid request on the same connection is answered."""
    response = client.request("GET", "/status")
    assert response.status_code == 200, f"after {what}: {response.text}"


# --------------------------------------------------------------------------- the executor

TRAJECTORY = "hardening-main"
EXECUTE = {
    "trajectory_id": TRAJECTORY,
    "tool": {"name": "terminal", "arguments": {"command": MARK}, "uniq_id": "call-1"},
    "timeout_s": 5,
}
# Every route with a body, a valid body for it, and where its string fields are.
EXECUTOR_ROUTES: dict[str, tuple[dict[str, Any], list[tuple[str | int, ...]]]] = {
    "/execute": (EXECUTE, [("trajectory_id",), ("tool", "name"), ("tool", "uniq_id")]),
    "/execute_batch": (
        {"calls": [EXECUTE]},
        [
            ("calls", 0, "trajectory_id"),
            ("calls", 0, "tool", "name"),
            ("calls", 0, "tool", "uniq_id"),
        ],
    ),
    "/release": ({"trajectory_id": TRAJECTORY}, [("trajectory_id",)]),
    "/artifacts/read": (
        {"trajectory_id": TRAJECTORY, "path": MARKER},
        [("trajectory_id",), ("path",)],
    ),
    "/artifacts/list": (
        {"trajectory_id": TRAJECTORY, "path": "."},
        [("trajectory_id",), ("path",)],
    ),
    "/artifacts/archive": (
        {"trajectory_id": TRAJECTORY, "path": "."},
        [("trajectory_id",), ("path",)],
    ),
}


def marker_exists(executor: ExecutorServer) -> bool:
    """Read on another route than the one fuzzed: the marker file in the trajectory's slot."""
    response = executor.client.post(
        "/artifacts/list", json={"trajectory_id": TRAJECTORY, "path": "."}
    )
    assert response.status_code == 200 and response.json()["success"], response.text
    return any(entry["path"] == MARKER for entry in response.json()["entries"])


@pytest.mark.parametrize("route", list(EXECUTOR_ROUTES))
def test_every_string_field_of_every_executor_route_refuses_hostile_values(
    executor: ExecutorServer, connection: CountingClient, route: str
) -> None:
    executor.sh(TRAJECTORY, f"rm -f {MARKER}")  # the trajectory holds its slot from here on
    requests_before = executor.status()["total_requests"]
    body, fields = EXECUTOR_ROUTES[route]
    for where in fields:
        for name, value in HOSTILE.items():
            what = f"{route} {'.'.join(map(str, where))} = {name}"
            assert_refused(connection.post(route, encoded(with_value(body, where, value))), what)
            assert_alive(connection, what)
    # One connection served every request: none was dropped after a refusal.
    assert connection.connects == 1
    # Nothing ran: no call reached the executor, no command wrote the marker, no release.
    assert executor.status()["total_requests"] == requests_before
    assert not marker_exists(executor)
    trajectories = executor.client.get("/trajectories").json()["trajectories"]
    assert TRAJECTORY in [t["trajectory_id"] for t in trajectories]


@pytest.mark.parametrize("kind", list(NOT_IJSON))
def test_a_body_that_is_not_ijson_is_400_on_every_executor_route(
    connection: CountingClient, kind: str
) -> None:
    for route in EXECUTOR_ROUTES:
        response = connection.post(route, NOT_IJSON[kind])
        assert response.status_code == 400, f"{route}: {response.text}"
        assert "I-JSON" in response.json()["error"], response.text
        assert_alive(connection, f"{kind} on {route}")
    assert connection.connects == 1


def test_the_reported_surrogate_cases_are_400_naming_the_problem(
    executor: ExecutorServer, connection: CountingClient
) -> None:
    """As found against the service: a lone surrogate in a path or a call id."""
    executor.sh(TRAJECTORY, f"rm -f {MARKER}")
    path_body = {"trajectory_id": TRAJECTORY, "path": LONE_SURROGATE}
    for route in ("/artifacts/read", "/artifacts/list", "/artifacts/archive"):
        response = connection.post(route, encoded(path_body))
        assert response.status_code == 400, response.text
        assert "lone surrogate \\ud800" in response.json()["error"]
        assert_alive(connection, route)
    call = with_value(EXECUTE, ("tool", "uniq_id"), "u\ud800")
    response = connection.post("/execute", encoded(call))
    assert response.status_code == 400, response.text
    assert_alive(connection, "/execute")
    assert connection.connects == 1
    assert not marker_exists(executor)


def test_paired_surrogate_escapes_are_text(executor: ExecutorServer) -> None:
    """Emoji as ``ensure_ascii`` clients send them (a pair of escapes) are valid I-JSON."""
    call = {
        "trajectory_id": TRAJECTORY,
        "tool": {"name": "write_file", "arguments": {"path": "emoji.txt", "content": "ok 😀"}},
    }
    assert b"\\ud83d\\ude00" in encoded(call)
    response = executor.client.post("/execute", content=encoded(call), headers=JSON)
    assert response.status_code == 200 and response.json()["success"], response.text
    assert executor.call(TRAJECTORY, "read_file", path="emoji.txt")["output"] == "ok 😀"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"trajectory_id": "", "tool": {"name": "terminal"}}, "trajectory_id"),
        ({"trajectory_id": "a\tb", "tool": {"name": "terminal"}}, "trajectory_id"),
        ({"trajectory_id": "t", "tool": {"name": "ter\x7fminal"}}, "tool.name"),
        ({"trajectory_id": "t", "tool": {"name": "x", "uniq_id": "u" * 257}}, "tool.uniq_id"),
        ({"trajectory_id": ""}, "trajectory_id"),
    ],
)
def test_field_bounds_are_422_naming_the_field(
    executor: ExecutorServer, body: dict[str, Any], field: str
) -> None:
    route = "/release" if "tool" not in body else "/execute"
    response = executor.client.post(route, content=encoded(body), headers=JSON)
    assert response.status_code == 422, response.text
    assert f"invalid request: {field}:" in response.json()["error"]


def test_ids_and_paths_at_their_bounds_are_accepted(executor: ExecutorServer) -> None:
    long_id = "t" * MAX_ID_CHARS
    result = executor.call(long_id, "no_such_tool")
    assert not result["success"] and "unknown tool" in result["error"]
    response = executor.client.post(
        "/artifacts/read", json={"trajectory_id": TRAJECTORY, "path": "p" * MAX_PATH_CHARS}
    )
    assert response.status_code == 200 and not response.json()["success"], response.text
    response = executor.client.post(
        "/artifacts/read", json={"trajectory_id": TRAJECTORY, "path": "p" * (MAX_PATH_CHARS + 1)}
    )
    assert response.status_code == 422 and "path" in response.json()["error"]


def test_arguments_nested_too_deep_are_refused_and_nothing_runs(
    executor: ExecutorServer, connection: CountingClient
) -> None:
    executor.sh(TRAJECTORY, f"rm -f {MARKER}")
    deep: Any = "x"
    for _ in range(MAX_ARGUMENT_DEPTH):
        deep = [deep]
    call = with_value(EXECUTE, ("tool", "arguments", "extra"), deep)
    response = connection.post("/execute", encoded(call))
    assert response.status_code == 422, response.text
    assert "tool.arguments" in response.json()["error"]
    assert_alive(connection, "deep arguments")
    # Deeper than Python's parser goes: the body itself is refused.
    abyss = b'{"trajectory_id": "t", "tool": {"name": "x", "arguments": {"a": ' + b"[" * 100_000
    abyss += b"]" * 100_000 + b"}}}"
    for route in EXECUTOR_ROUTES:
        assert_refused(connection.post(route, abyss), f"deep body on {route}")
        assert_alive(connection, f"deep body on {route}")
    # An integer of more digits than Python parses.
    huge = b'{"trajectory_id": "t", "tool": {"name": "x", "arguments": {"n": 1' + b"0" * 5000
    assert_refused(connection.post("/execute", huge + b"}}}"), "a 5001-digit integer")
    assert connection.connects == 1
    assert not marker_exists(executor)


def test_bounded_oddities_in_a_valid_call_are_answered(executor: ExecutorServer) -> None:
    """Numbers at the edges of a valid call: clamped or ignored, never a failure of the
    service (``arguments.timeout`` beyond any float, a timeout_s that parses as infinity)."""
    body = {
        "trajectory_id": TRAJECTORY,
        "tool": {"name": "terminal", "arguments": {"command": "echo ok", "timeout": 10**400}},
    }
    response = executor.client.post("/execute", content=encoded(body), headers=JSON)
    assert response.status_code == 200 and response.json()["output"] == "ok", response.text
    body = {"trajectory_id": TRAJECTORY, "tool": {"name": "terminal", "arguments": {}}}
    response = executor.client.post(
        "/execute", content=encoded(body)[:-1] + b', "timeout_s": 1e400}', headers=JSON
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "query", ["offset=-1", "limit=0", "limit=100000", "limit=abc", "offset=%00", "offset=%ff"]
)
def test_trajectories_with_a_bad_query_is_422(connection: CountingClient, query: str) -> None:
    response = connection.request("GET", f"/trajectories?{query}")
    assert_refused(response, query)
    assert_alive(connection, query)


# ---- a result is never lost


def test_output_that_is_not_utf8_arrives(executor: ExecutorServer) -> None:
    result = executor.sh(TRAJECTORY, r"printf 'ok \377\355\240\200'")
    assert result["success"], result
    assert result["output"].startswith("ok \ufffd")


def test_output_with_odd_characters_arrives(executor: ExecutorServer) -> None:
    result = executor.sh(TRAJECTORY, r"printf 'a\000b\033[31mred\177 \300\257 \342\202'")
    assert result["success"], result
    assert result["output"].startswith("a\x00b\x1b[31mred\x7f")
    assert "\ufffd" in result["output"]


def test_files_named_with_invalid_utf8_are_listed_and_archived(executor: ExecutorServer) -> None:
    trajectory = "hardening-names"
    made = executor.sh(trajectory, "mkdir d && touch \"d/bad-$(printf '\\377\\355\\240\\200')\"")
    assert made["success"], made
    listing = executor.client.post(
        "/artifacts/list", json={"trajectory_id": trajectory, "path": "d"}
    )
    assert listing.status_code == 200, listing.text
    entries = listing.json()["entries"]
    assert listing.json()["success"] and len(entries) == 1, listing.text
    assert entries[0]["path"].startswith("d/bad-\ufffd")
    archive = executor.client.post(
        "/artifacts/archive", json={"trajectory_id": trajectory, "path": "d"}
    )
    assert archive.status_code == 200 and archive.json()["success"], archive.text
    assert archive.json()["entry_count"] == 1
    # A command that prints the name: its output arrives too.
    assert executor.sh(trajectory, "ls d")["output"].startswith("bad-\ufffd")
    executor.client.post("/release", json={"trajectory_id": trajectory})


# ---- tool arguments: a clear failure of the call, never of the service

# For each tool, arguments it must refuse with a message (NUL, wrong types).
BAD_ARGUMENTS: dict[str, list[dict[str, Any]]] = {
    "terminal": [{"command": f"{MARK}\x00; true"}, {"command": 1}, {"command": ["ls"]}, {}],
    "bash_stateful": [{"command": f"{MARK}\x00"}, {"command": None}, {"command": {"a": 1}}],
    "python": [{"code": "open('m','w')\x00"}, {"code": 1}, {"code": None}],
    "read_file": [{"path": "a\x00b"}, {"path": 1}, {"path": ["a"]}, {"path": None}],
    "write_file": [
        {"path": "a\x00b", "content": "x"},
        {"path": 5, "content": "x"},
        {"path": "w.txt", "content": 1},
        {"path": "w.txt", "content": ["x"]},
    ],
    "edit_file": [
        {"path": "a\x00b", "old_string": "a", "new_string": "b"},
        {"path": "e.txt", "old_string": 1, "new_string": "b"},
        {"path": "e.txt", "old_string": "a", "new_string": None},
    ],
    "tmux": [
        {"action": "send_keys", "keys": "a\x00"},
        {"action": "send_keys", "keys": 1},
        {"action": "start", "pane_width": "wide"},
        {"action": "start", "pane_height": 10**400},
        {"action": "send_keys", "keys": ["ls"], "max_wait_s": 10**400, "block": True},
    ],
}


def test_bad_tool_arguments_fail_the_call_clearly_through_the_executor(
    executor: ExecutorServer,
) -> None:
    executor.sh(TRAJECTORY, f"rm -f {MARKER} m")
    for tool, variants in BAD_ARGUMENTS.items():
        for arguments in variants:
            result = executor.call(TRAJECTORY, tool, **arguments)
            what = f"{tool} {arguments!r:.80}"
            assert result["success"] is False, what
            assert result["error"] and "internal error" not in result["error"], what
    assert not marker_exists(executor)
    assert executor.sh(TRAJECTORY, "test -e m || echo absent")["output"] == "absent"


def test_nul_in_a_command_names_the_problem(executor: ExecutorServer) -> None:
    result = executor.sh(TRAJECTORY, "echo a\x00b")
    assert result["success"] is False
    assert "'command' must not contain NUL" in result["error"]


# ---- any JSON the request models accept is answered without a 5xx

# Sandbox tools only for these trajectories: every other trajectory id stays leaseless, so the
# pool's few slots are never all held by generated ids.
LEASED = ["hyp-a", "hyp-b"]
# Any character, surrogates and controls included, with the troublesome ones drawn often.
ODD_CHARACTERS = st.sampled_from(["\ud800", "\udcff", "\x00", "\x1b", "\x7f", "\u2028", "😀"])
ANY_TEXT = st.lists(ODD_CHARACTERS | st.characters(exclude_categories=()), max_size=24).map("".join)
ODD_NUMBERS = st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**400, 1e308, -0.0, 1e-320])
SCALAR = st.one_of(
    ANY_TEXT, st.integers(), ODD_NUMBERS, st.floats(), st.booleans(), st.none(), st.just("x" * 300)
)
JUNK = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=12,
)
ARGUMENTS = st.dictionaries(
    st.sampled_from(["path", "content", "timeout", "encoding", "allow_network"]) | ANY_TEXT,
    JUNK,
    max_size=4,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type (any text for a string), one time in eight anything:
    most requests get past the models and reach the executor and its sandboxes."""
    return st.integers(0, 7).flatmap(lambda pick: JUNK if pick == 7 else valid)


@st.composite
def execute_bodies(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):  # a cheap sandbox call on a leased trajectory
        trajectory: Any = draw(st.sampled_from(LEASED))
        name: Any = "read_file"
    else:
        trajectory = draw(field(ANY_TEXT))
        name = draw(field(st.sampled_from(["list", "no_such_tool"]) | ANY_TEXT))
    tool: dict[str, Any] = {"name": name, "arguments": draw(field(ARGUMENTS))}
    if draw(st.booleans()):
        tool["uniq_id"] = draw(field(ANY_TEXT))
    return {"trajectory_id": trajectory, "tool": tool, "timeout_s": draw(field(st.just(1)))}


def artifact_bodies(extra: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    trajectory = st.sampled_from(LEASED) | ANY_TEXT
    return st.fixed_dictionaries(
        {"trajectory_id": field(trajectory), "path": field(ANY_TEXT)},
        optional={name: field(values) for name, values in extra.items()},
    )


REQUESTS = st.one_of(
    st.tuples(st.just("/execute"), execute_bodies()),
    st.tuples(
        st.just("/execute_batch"),
        st.fixed_dictionaries({"calls": field(st.lists(execute_bodies(), max_size=3))}),
    ),
    st.tuples(
        st.just("/release"),
        st.fixed_dictionaries(
            {"trajectory_id": field(st.sampled_from(LEASED) | ANY_TEXT)},
            optional={"reset_workspace": field(st.booleans())},
        ),
    ),
    st.tuples(
        st.just("/artifacts/read"),
        artifact_bodies(
            {
                "encoding": st.sampled_from(["text", "base64"]),
                "max_bytes": st.integers(min_value=0),
                "include_sha256": st.booleans(),
            }
        ),
    ),
    st.tuples(
        st.just("/artifacts/list"),
        artifact_bodies({"recursive": st.booleans(), "max_entries": st.integers(min_value=0)}),
    ),
    st.tuples(
        st.just("/artifacts/archive"),
        artifact_bodies(
            {"format": st.sampled_from(["tar.gz", "tgz"]), "max_entries": st.integers(0, 10)}
        ),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=REQUESTS)
def test_any_request_is_answered_without_a_5xx(
    executor: ExecutorServer, request: tuple[str, Any]
) -> None:
    route, body = request
    response = executor.client.post(route, content=encoded(body), headers=JSON)
    assert response.status_code < 500, f"{route} {body!r:.300}: {response.text}"
    response.json()  # every answer is JSON


# --------------------------------------------------------------------------- a sandbox server

ITEM = {"slot_id": "slot_0", "tool": "terminal", "args": {"command": MARK}, "execution_id": "e1"}
SANDBOX_ROUTES: dict[str, tuple[Any, list[tuple[str | int, ...]]]] = {
    "/execute": (ITEM, [("slot_id",), ("tool",), ("execution_id",)]),
    "/batch": ([ITEM], [(0, "slot_id"), (0, "tool"), (0, "execution_id")]),
    "/batch/stream": ([ITEM], [(0, "slot_id"), (0, "tool"), (0, "execution_id")]),
    "/reset": ({"slot_id": "slot_0"}, [("slot_id",)]),
    "/artifacts/read": ({"slot_id": "slot_0", "path": MARKER}, [("slot_id",), ("path",)]),
    "/artifacts/list": ({"slot_id": "slot_0", "path": "."}, [("slot_id",), ("path",)]),
    "/artifacts/archive": ({"slot_id": "slot_0", "path": "."}, [("slot_id",), ("path",)]),
}
# Fewer values than against the executor: the models are the same.
SANDBOX_HOSTILE = {k: HOSTILE[k] for k in ("lone surrogate", "NUL", "100,000 chars", "int", "null")}


def results_of(route: str, response: httpx.Response) -> list[dict[str, Any]]:
    if route == "/batch/stream":
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]
    answer = response.json()
    return answer if isinstance(answer, list) else [answer]


@pytest.mark.parametrize("route", list(SANDBOX_ROUTES))
def test_every_string_field_of_every_sandbox_route_refuses_hostile_values(
    sandbox: SandboxServer, route: str
) -> None:
    """Call routes fail a bad item alone (200, ``success: false``, as the old containers
    did); the others answer 4xx. Either way nothing runs and the connection lives on."""
    sandbox.sh("slot_0", f"rm -f {MARKER}")
    client = CountingClient(sandbox.url)
    body, fields = SANDBOX_ROUTES[route]
    try:
        for where in fields:
            for name, value in SANDBOX_HOSTILE.items():
                if where[-1] == "execution_id" and value is None:
                    continue  # an item may have no id: it is a valid item
                what = f"{route} {'.'.join(map(str, where))} = {name}"
                response = client.post(route, encoded(with_value(body, where, value)))
                if route in ("/execute", "/batch", "/batch/stream") and response.status_code == 200:
                    results = results_of(route, response)
                    assert results and not any(r["success"] for r in results), what
                else:
                    assert_refused(response, what)
                alive = client.request("GET", "/slots")
                assert alive.status_code == 200, f"after {what}: {alive.text}"
        for kind, raw in NOT_IJSON.items():
            response = client.post(route, raw)
            assert response.status_code == 400 and "I-JSON" in response.text, kind
        assert client.connects == 1
    finally:
        client.close()
    assert sandbox.sh("slot_0", f"test -e {MARKER} || echo absent")["output"] == "absent"


def test_a_sandbox_body_nested_past_the_parser_is_400(sandbox: SandboxServer) -> None:
    client = CountingClient(sandbox.url)
    try:
        for route in ("/execute", "/batch", "/batch/stream", "/reset"):
            response = client.post(route, b"[" * 100_000 + b"]" * 100_000)
            assert response.status_code == 400, f"{route}: {response.text}"
        deep: Any = 1
        for _ in range(900):
            deep = [deep]
        item = with_value(ITEM, ("args", "deep"), deep)
        response = client.post("/batch", encoded([item]))
        assert response.status_code == 200, response.text
        assert "args" in response.json()[0]["error"]
        assert client.connects == 1
    finally:
        client.close()


def test_bad_tool_arguments_fail_the_item_clearly_in_the_sandbox(sandbox: SandboxServer) -> None:
    slot = "slot_1"
    for tool, variants in BAD_ARGUMENTS.items():
        for arguments in variants:
            result = sandbox.run(slot, tool, **arguments)
            what = f"{tool} {arguments!r:.80}"
            assert result["success"] is False, what
            assert result["error"] and "internal error" not in result["error"], what
    not_objects: list[Any] = [[], "ls", None, 5]
    for args in not_objects:
        response = sandbox.client.post(
            "/execute", json={"slot_id": slot, "tool": "terminal", "args": args}
        )
        assert response.status_code == 200 and not response.json()["success"], response.text
    assert sandbox.sh(slot, "echo still here")["output"] == "still here"
    state = next(s for s in sandbox.client.get("/slots").json()["slots"] if s["slot_id"] == slot)
    assert state["restarts"] == 0  # no argument killed the slot's agent


def test_sandbox_results_with_odd_text_arrive_on_every_route(sandbox: SandboxServer) -> None:
    slot = "slot_2"
    made = sandbox.sh(slot, "touch \"f-$(printf '\\377')\"; printf 'out \\377\\355\\240\\200'")
    assert made["success"] and made["output"].startswith("out \ufffd"), made
    item = {"slot_id": slot, "tool": "terminal", "args": {"command": "ls"}}
    streamed = sandbox.client.post("/batch/stream", json=[item])
    assert streamed.status_code == 200, streamed.text
    line = json.loads(streamed.text)
    assert line["success"] and line["output"].startswith("f-\ufffd"), line
    listing = sandbox.client.post("/artifacts/list", json={"slot_id": slot, "path": "."})
    assert listing.status_code == 200, listing.text
    assert [e["path"] for e in listing.json()["entries"]] == ["f-\ufffd"]
