"""Isolation between slots and from the host, under real bubblewrap."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from harness.processes import CONNECT_PROBE
from harness.servers import SandboxServer


def test_slot_sees_only_its_own_workspace(sandbox: SandboxServer) -> None:
    secret = "slot-zero-secret-5d1e"
    assert sandbox.run("slot_0", "write_file", path="secret.txt", content=secret)["success"]
    host_copy = sandbox.data_dir / "slots" / "slot_0" / "workspace" / "secret.txt"
    assert host_copy.read_text() == secret

    listing = sandbox.sh("slot_1", "ls -A /workspace /tmp")
    assert "secret.txt" not in listing["output"]
    probe = sandbox.sh(
        "slot_1", f"cat {host_copy} 2>&1; grep -rs {secret} /workspace /tmp /run /home 2>&1"
    )
    assert secret not in probe["output"]
    assert "No such file" in probe["output"]

    # The read_file tool is bound to the slot's own workspace too.
    read = sandbox.run("slot_1", "read_file", path="secret.txt")
    assert not read["success"]


def test_slot_cannot_write_the_host(sandbox: SandboxServer) -> None:
    marker = sandbox.data_dir / "slots" / "slot_1" / "workspace" / "planted"
    result = sandbox.sh(
        "slot_0",
        f"touch /usr/planted /etc/planted /planted 2>&1; echo x > {marker} 2>&1; "
        "echo x > /run/atropos/agent/main.py 2>&1; echo done",
    )
    assert "done" in result["output"]
    assert result["output"].count("Read-only file system") >= 2
    assert not os.path.exists("/usr/planted") and not os.path.exists("/etc/planted")
    assert not marker.exists()
    # The agent's package is bound read-only: the slot cannot rewrite its own supervisor.
    assert "import" in (sandbox.data_dir / "runtime" / "agent" / "main.py").read_text()


def test_slots_run_as_distinct_unprivileged_users(sandbox: SandboxServer) -> None:
    result = sandbox.sh("slot_2", "id -u; cat /proc/self/status | grep CapEff")
    uid, caps = result["output"].split("\n", 1)
    assert uid.strip() == "1000"
    assert caps.split()[1] == "0000000000000000"
    if os.geteuid() == 0:
        owners = {
            slot: (sandbox.data_dir / "slots" / slot / "workspace").stat().st_uid
            for slot in ("slot_0", "slot_1")
        }
        assert owners["slot_0"] >= 200_000
        assert owners["slot_1"] == owners["slot_0"] + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="per-slot uids need a root server")
def test_servers_on_one_host_claim_disjoint_uids(
    sandbox: SandboxServer, sandbox_factory: Callable[..., SandboxServer]
) -> None:
    """Two servers with the same preferred uid base never share a slot uid."""
    other = sandbox_factory(slots=2)
    mine = {p.stat().st_uid for p in (sandbox.data_dir / "slots").glob("*/workspace")}
    theirs = {p.stat().st_uid for p in (other.data_dir / "slots").glob("*/workspace")}
    assert len(mine) == 4 and len(theirs) == 2
    assert not mine & theirs


def test_private_pid_namespace_and_tmp(sandbox: SandboxServer) -> None:
    result = sandbox.sh("slot_3", "echo hello > /tmp/mine; ps -e --no-headers | wc -l")
    assert int(result["output"].strip()) < 10  # only the slot's own processes are visible
    other = sandbox.sh("slot_2", "cat /tmp/mine 2>&1")
    assert "No such file" in other["output"]


def test_no_server_secret_in_command_environment(
    sandbox_factory: Callable[..., SandboxServer],
) -> None:
    server = sandbox_factory(slots=1, env={"DATABASE_PASSWORD": "hunter2-host-secret"})
    result = server.sh(
        "slot_0", "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; cat /proc/*/cmdline"
    )
    assert server.token and server.token not in result["output"]
    assert "hunter2-host-secret" not in result["output"]
    assert "ATROPOS_SANDBOX" not in result["output"]
    assert "HOME=/workspace" in result["output"]


def test_no_network_when_disallowed(sandbox_factory: Callable[..., SandboxServer]) -> None:
    isolated = sandbox_factory(slots=1, args=["--no-network"])
    connected = sandbox_factory(slots=1)
    # Both try to reach a port that is listening on the host's loopback.
    code = CONNECT_PROBE.format(port=connected.port)
    assert "refused" in isolated.run("slot_0", "python", code=code)["output"]
    assert "connected" in connected.run("slot_0", "python", code=code)["output"]
    interfaces = isolated.sh("slot_0", "cat /proc/net/dev")["output"]
    assert "lo:" in interfaces
    assert not [line for line in interfaces.splitlines()[2:] if "lo:" not in line]
    assert isolated.client.get("/health").json()["network"] is False
