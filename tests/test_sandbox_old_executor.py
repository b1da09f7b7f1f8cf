"""An old executor drives a new sandbox server unchanged (docs/sandbox.md, "Protocol versions").

What the old executor relied on: ``POST /batch`` answers every item, in order, with HTTP 200
(an unknown slot, unknown tool or invalid field fails that item only); ``bash_stateful`` is
the stateful terminal; ``args.allow_network: false`` runs that call without network; ``/reset``
answers ``{success, output, error, metadata}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from atropos_agent.sandbox.isolation import SlotPaths, agent_config, bwrap_prefix
from atropos_agent.sandbox.protocol import ResetResponse
from atropos_agent.sandbox.settings import SandboxSettings
from harness.processes import CONNECT_PROBE
from harness.servers import SandboxServer

Factory = Callable[..., SandboxServer]

# Interfaces and network namespace a command sees.
NETWORK = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; readlink /proc/self/ns/net"


def item(slot: str, tool: str, uniq_id: str | None = None, **args: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"slot_id": slot, "tool": tool, "args": args}
    if uniq_id is not None:
        entry["execution_id"] = uniq_id
    return entry


def batch(sandbox: SandboxServer, items: list[Any], route: str = "/batch") -> list[dict[str, Any]]:
    """The results of a batch, in item order, for ``/batch`` and ``/batch/stream`` alike."""
    if route == "/batch":
        response = sandbox.client.post(route, json=items)
        assert response.status_code == 200, response.text
        results: list[dict[str, Any]] = response.json()
        return results
    with sandbox.client.stream("POST", route, json=items) as streamed:
        assert streamed.status_code == 200, streamed.read()
        lines = [json.loads(line) for line in streamed.iter_lines() if line.strip()]
    assert sorted(line["index"] for line in lines) == list(range(len(items)))
    return [line for line in sorted(lines, key=lambda line: line["index"])]


def network_of(result: dict[str, Any]) -> tuple[set[str], str]:
    """(interfaces, network namespace) from the output of ``NETWORK``."""
    assert result["success"], result
    *interfaces, namespace = result["output"].split()
    return set(interfaces), namespace


def host_interfaces() -> set[str]:
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


# --------------------------------------------------------------------------- one bad item


@pytest.mark.parametrize("route", ["/batch", "/batch/stream"])
def test_old_executor_batch_one_unknown_tool_fails_alone(
    sandbox: SandboxServer, route: str
) -> None:
    name = f"old-{route.strip('/').replace('/', '-')}.txt"
    items = [
        item("slot_0", "bash", "e1", command="echo from-bash"),
        item("slot_0", "write_file", "e2", path=name, content="hello"),
        item("slot_0", "bash_stateful", "e3", command=f"cat /workspace/{name}; echo; cd /tmp"),
        item("slot_1", "frobnicate", "e4", command="true"),
    ]
    results = batch(sandbox, items, route)
    assert [r["execution_id"] for r in results] == ["e1", "e2", "e3", "e4"]
    assert [r["success"] for r in results] == [True, True, True, False], results
    assert results[0]["output"].strip() == "from-bash"
    assert results[1]["metadata"]["path"] == name
    assert results[2]["output"].strip() == "hello"
    # bash_stateful is the stateful terminal: its shell is still in /tmp.
    assert sandbox.run("slot_0", "bash_stateful", command="pwd")["output"].strip() == "/tmp"
    unknown = results[3]
    assert unknown["error"].startswith("Unknown tool: frobnicate"), unknown
    assert "terminal" in unknown["error"]  # the known tools are listed
    assert unknown["output"] == ""
    assert unknown["metadata"] == {"slot_id": "slot_1"}
    assert sandbox.run("slot_0", "read_file", path=name)["output"] == "hello"


@pytest.mark.parametrize("route", ["/batch", "/batch/stream"])
@pytest.mark.parametrize(
    ("bad", "error", "metadata"),
    [
        (item("slot_9", "terminal", "bad", command="true"), "Unknown slot: slot_9", {}),
        (
            {**item("slot_2", "terminal", "bad", command="true"), "timeout": -1},
            "Invalid item: timeout:",
            {"slot_id": "slot_2"},
        ),
        (
            {**item("slot_2", "terminal", "bad", command="true"), "timeout": "soon"},
            "Invalid item: timeout:",
            {"slot_id": "slot_2"},
        ),
        (
            {"slot_id": "slot_2", "args": {"command": "true"}, "execution_id": "bad"},
            "Invalid item: tool: Field required",
            {"slot_id": "slot_2"},
        ),
        (
            {"tool": "terminal", "args": {}, "execution_id": "bad"},
            "Invalid item: slot_id: Field required",
            {},
        ),
        (
            {**item("slot_2", "terminal", "bad"), "args": "ls"},
            "Invalid item: args:",
            {"slot_id": "slot_2"},
        ),
        (
            item("slot_2", "terminal", "bad", command="true", allow_network="no"),
            "Invalid item: args.allow_network must be true or false",
            {"slot_id": "slot_2"},
        ),
    ],
    ids=[
        "unknown-slot",
        "negative-timeout",
        "text-timeout",
        "no-tool",
        "no-slot",
        "args-not-object",
        "allow-network-not-bool",
    ],
)
def test_bad_item_fails_alone(
    sandbox: SandboxServer, route: str, bad: dict[str, Any], error: str, metadata: dict[str, Any]
) -> None:
    items = [
        item("slot_2", "terminal", "before", command="echo before"),
        bad,
        item("slot_3", "terminal", "after", command="echo after"),
    ]
    results = batch(sandbox, items, route)
    assert [r["execution_id"] for r in results] == ["before", "bad", "after"]
    assert [r["output"].strip() for r in (results[0], results[2])] == ["before", "after"]
    assert results[0]["success"] and results[2]["success"]
    failed = results[1]
    assert failed["success"] is False
    assert failed["error"].startswith(error), failed
    assert failed["output"] == ""
    assert failed["metadata"] == metadata


def test_invalid_item_error_names_the_field_and_value(sandbox: SandboxServer) -> None:
    bad = {**item("slot_0", "terminal", command="true"), "timeout": -1}
    (result,) = batch(sandbox, [bad])
    assert result["error"] == "Invalid item: timeout: Input should be greater than 0 (got -1)"
    assert result["execution_id"] is None


def test_every_item_bad_is_still_200(sandbox: SandboxServer) -> None:
    results = batch(sandbox, [item("slot_7", "terminal"), item("slot_0", "nope")])
    assert [r["success"] for r in results] == [False, False]
    assert results[0]["error"] == "Unknown slot: slot_7 (this sandbox has slot_0..slot_3)"
    assert batch(sandbox, []) == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"slot_id": "slot_0", "tool": "terminal"}, 422),
        ("just text", 422),
        (42, 422),
        ([item("slot_0", "terminal", command="true"), "not an object"], 422),
        ([[item("slot_0", "terminal", command="true")]], 422),
        (None, 422),
    ],
    ids=["object", "string", "number", "list-with-string", "nested-list", "null"],
)
@pytest.mark.parametrize("route", ["/batch", "/batch/stream"])
def test_batch_body_not_a_list_of_objects_is_refused(
    sandbox: SandboxServer, route: str, body: Any, status: int
) -> None:
    response = sandbox.client.post(route, content=json.dumps(body).encode())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.startswith("invalid request: body: a batch must be a JSON list of objects")


@pytest.mark.parametrize("route", ["/batch", "/batch/stream", "/execute"])
def test_malformed_json_refused_with_400(sandbox: SandboxServer, route: str) -> None:
    response = sandbox.client.post(route, content=b'[{"slot_id": ', headers={"Content-Type": "x"})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("malformed JSON body")


def test_execute_item_errors_are_results(sandbox: SandboxServer) -> None:
    for body, error in [
        (item("slot_9", "terminal", "x1", command="true"), "Unknown slot: slot_9"),
        (item("slot_0", "rm_rf", "x2"), "Unknown tool: rm_rf"),
        ({**item("slot_0", "terminal", "x3", command="true"), "timeout": 0}, "Invalid item"),
    ]:
        response = sandbox.client.post("/execute", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["success"] is False
        assert result["error"].startswith(error), result
        assert result["execution_id"] == body["execution_id"]
    for not_an_object in ([item("slot_0", "terminal")], "text", 1):
        response = sandbox.client.post("/execute", json=not_an_object)
        assert response.status_code == 422, response.text
        assert "must be a JSON object" in response.json()["error"]


def test_batch_routes_document_their_body(sandbox: SandboxServer) -> None:
    paths = sandbox.client.get("/openapi.json").json()["paths"]
    for route in ("/batch", "/batch/stream"):
        schema = paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "array"
        assert "slot_id" in schema["items"]["properties"]
    execute = paths["/execute"]["post"]["requestBody"]["content"]["application/json"]
    assert "execution_id" in execute["schema"]["properties"]


# --------------------------------------------------------------------------- reset


def test_reset_answers_the_old_shape(sandbox: SandboxServer) -> None:
    response = sandbox.client.post("/reset", json={"slot_id": "slot_3"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "output": "Reset workspace for slot_3",
        "error": "",
        "metadata": {},
        "status": "ok",
        "slot_id": "slot_3",
    }
    # The executor's client parses both this answer and an older sandbox's.
    assert ResetResponse.model_validate(response.json()).slot_id == "slot_3"
    assert ResetResponse.model_validate({"status": "ok", "slot_id": "slot_1"}).success is True


# --------------------------------------------------------------------------- network per item


def test_allow_network_false_item_runs_without_network(sandbox: SandboxServer) -> None:
    code = CONNECT_PROBE.format(port=sandbox.port)
    narrowed = batch(
        sandbox,
        [
            item(
                "slot_0",
                "bash_stateful",
                "s",
                command="export KEPT=1; echo kept > /workspace/kept.txt",
            ),
            item("slot_0", "bash", "n", command=NETWORK, allow_network=False),
            item("slot_0", "python", "c", code=code, allow_network=False),
            item("slot_1", "bash", "p", command=NETWORK),
            item("slot_1", "python", "pc", code=code),
        ],
    )
    isolated, plain = narrowed[1], narrowed[3]
    isolated_interfaces, isolated_ns = network_of(isolated)
    plain_interfaces, plain_ns = network_of(plain)
    assert isolated_interfaces == {"lo"}
    assert plain_interfaces == host_interfaces()  # the server's own network
    assert isolated_ns != plain_ns
    assert "refused" in narrowed[2]["output"]
    assert "connected" in narrowed[4]["output"]
    assert isolated["metadata"]["network_isolated"] is True
    assert narrowed[2]["metadata"]["network_isolated"] is True
    assert plain["metadata"]["network_isolated"] is False
    # Switching restarted slot_0's agent once, and said so; slot_1 never switched.
    assert isolated["metadata"]["slot_restarted"].startswith("network mode changed")
    assert "without network" in isolated["metadata"]["slot_restarted"]
    assert "slot_restarted" not in narrowed[2]["metadata"]
    assert "slot_restarted" not in plain["metadata"]
    slots = {s["slot_id"]: s for s in sandbox.client.get("/slots").json()["slots"]}
    assert slots["slot_0"]["network"] is False and slots["slot_1"]["network"] is True

    # The same slot back to the server's mode: its processes ended, its files stayed.
    back = batch(
        sandbox,
        [
            item("slot_0", "bash", "b", command=NETWORK),
            item(
                "slot_0",
                "bash_stateful",
                "v",
                command="echo ${KEPT:-gone}; cat /workspace/kept.txt",
            ),
        ],
    )
    back_interfaces, back_ns = network_of(back[0])
    assert back_interfaces == plain_interfaces
    assert back_ns == plain_ns
    assert back[0]["metadata"]["network_isolated"] is False
    assert back[0]["metadata"]["slot_restarted"].startswith("network mode changed")
    assert "with network" in back[0]["metadata"]["slot_restarted"]
    assert back[1]["output"].split() == ["gone", "kept"]


def test_reset_returns_a_slot_to_the_servers_network_mode(sandbox: SandboxServer) -> None:
    isolated = sandbox.run("slot_2", "terminal", command=NETWORK, allow_network=False)
    assert network_of(isolated)[0] == {"lo"}
    assert sandbox.client.post("/reset", json={"slot_id": "slot_2"}).status_code == 200
    slots = {s["slot_id"]: s for s in sandbox.client.get("/slots").json()["slots"]}
    assert slots["slot_2"]["network"] is True
    after = sandbox.sh("slot_2", NETWORK)
    assert network_of(after)[0] == host_interfaces()
    assert "slot_restarted" not in after["metadata"]


def test_an_item_never_widens_a_no_network_server(sandbox_factory: Factory) -> None:
    server = sandbox_factory(slots=1, args=["--no-network"])
    results = batch(
        server,
        [
            item("slot_0", "bash", command=NETWORK, allow_network=True),
            item("slot_0", "bash", command=NETWORK, allow_network=False),
            item("slot_0", "bash", command=NETWORK),
        ],
    )
    namespaces = {network_of(result)[1] for result in results}
    assert len(namespaces) == 1  # one agent served all three: no switch
    for result in results:
        assert network_of(result)[0] == {"lo"}
        assert "slot_restarted" not in result["metadata"]
        assert result["metadata"]["network_isolated"] is True


def test_allow_network_false_needs_bubblewrap(sandbox_factory: Factory) -> None:
    # Slot uids of its own: isolation "none" kills every process of its slots' uids on stop.
    uid_base = str(5_100_000 + (os.getpid() % 20_000) * 64)
    server = sandbox_factory(args=["--isolation", "none", "--slot-uid-base", uid_base], slots=1)
    results = batch(
        server,
        [
            item("slot_0", "terminal", "no-net", command="echo ran", allow_network=False),
            item("slot_0", "terminal", "net", command="echo ran"),
        ],
    )
    assert results[0]["success"] is False
    assert results[0]["error"].startswith("network isolation needs bubblewrap"), results[0]
    assert results[0]["output"] == ""
    assert results[1]["output"].strip() == "ran"


def test_bwrap_command_line_per_network_mode(tmp_path: Path) -> None:
    paths = SlotPaths(root=tmp_path, workspace=tmp_path / "w", tmp=tmp_path / "t")
    allowing = SandboxSettings(allow_network=True)
    closed = SandboxSettings(allow_network=False)
    assert "--unshare-net" not in bwrap_prefix(allowing, paths, tmp_path)
    assert "--unshare-net" not in bwrap_prefix(allowing, paths, tmp_path, True)
    assert "--unshare-net" in bwrap_prefix(allowing, paths, tmp_path, False)
    for network in (None, True, False):
        assert "--unshare-net" in bwrap_prefix(closed, paths, tmp_path, network)
    assert agent_config(allowing, paths)["network_isolated"] is False
    assert agent_config(allowing, paths, False)["network_isolated"] is True
    assert agent_config(closed, paths, True)["network_isolated"] is True
    unsandboxed = SandboxSettings(isolation="none", allow_network=False)
    assert agent_config(unsandboxed, paths, False)["network_isolated"] is False


def test_stream_and_batch_agree_on_item_errors(sandbox: SandboxServer) -> None:
    items = [item("slot_0", "nope", "a"), item("slot_8", "terminal", "b", command="true")]
    assert batch(sandbox, items) == [
        {k: v for k, v in line.items() if k != "index"}
        for line in batch(sandbox, items, "/batch/stream")
    ]
    # Old executors need 2 or later: a newer protocol only adds.
    assert httpx.get(sandbox.url + "/health").json()["protocol_version"] >= 2
