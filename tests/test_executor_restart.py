"""An executor started again after its predecessor stopped or was killed: trajectories that held
leases are told their workspace is gone, on every route, until they release; what a killed
executor left on disk is removed, and never what a live one uses; two live executors never
share a journal or a data dir."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.nomad_double import NomadDouble
from harness.servers import (
    DEFAULT_BACKEND,
    ExecutorServer,
    free_port,
    start_nomad_double,
    temporary_dir,
)
from tests.executor_support import local_backend_only, pid_alive, settings, wait_for

Factory = Callable[..., ExecutorServer]


@pytest.fixture
def state_dir(executor_factory: Factory) -> Iterator[Path]:
    """A state directory shared by the test's executors; removed after all of them stopped
    (it depends on ``executor_factory``, so it is torn down first)."""
    with temporary_dir() as path:
        yield path / "state"


@pytest.fixture
def nomad() -> Iterator[NomadDouble | None]:
    """On the Nomad backend, one double for the test's executors: the pool job outlives a
    killed executor there, as it does on a real cluster."""
    if DEFAULT_BACKEND != "nomad":
        yield None
        return
    double = start_nomad_double()
    yield double
    double.close()


def stop_with(server: ExecutorServer, signum: signal.Signals) -> None:
    server.process.send_signal(signum)
    server.process.wait(timeout=30)


def sandbox_pids(server: ExecutorServer) -> list[int]:
    return [child["pid"] for child in server.status()["pool"]["backend"]["children"]]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_after_a_restart_old_trajectories_hear_their_workspace_is_lost(
    executor_factory: Factory, state_dir: Path, nomad: NomadDouble | None, signum: signal.Signals
) -> None:
    port = free_port()
    first = executor_factory(port=port, state_dir=state_dir, nomad=nomad, env=settings())
    wrote = first.sh("restart-old", "echo kept > keep.txt && echo ok")
    assert wrote["success"], wrote
    assert first.sh("restart-released", "echo x > x.txt && echo ok")["success"]
    assert first.client.post("/release", json={"trajectory_id": "restart-released"}).is_success
    stop_with(first, signum)

    second = executor_factory(port=port, state_dir=state_dir, nomad=nomad, env=settings())
    for result in (
        second.sh("restart-old", "cat keep.txt"),
        second.call("restart-old", "write_file", path="keep.txt", content="new"),
    ):
        assert result["success"] is False, result
        assert result["metadata"]["workspace_lost"] is True, result
        assert "workspace lost for trajectory 'restart-old'" in result["error"], result
        assert "executor restarted" in result["error"], result
    for route, fields in (
        ("/artifacts/read", {"path": "keep.txt"}),
        ("/artifacts/list", {}),
        ("/artifacts/archive", {}),
    ):
        answer = second.client.post(route, json={"trajectory_id": "restart-old", **fields})
        assert answer.status_code == 200, (route, answer.text)
        assert answer.json()["success"] is False, (route, answer.json())
        assert "workspace lost" in answer.json()["error"], (route, answer.json())
        assert "executor restarted" in answer.json()["error"], (route, answer.json())

    released = second.client.post("/release", json={"trajectory_id": "restart-old"})
    assert released.status_code == 200, released.text
    assert released.json()["released"] is False and released.json()["note"], released.json()
    fresh = second.sh("restart-old", "ls -A /workspace; echo fresh")
    assert fresh["success"] and fresh["output"] == "fresh", fresh
    # Released before the restart: nothing to tell, a new trajectory like any other.
    other = second.sh("restart-released", "ls -A /workspace; echo fresh")
    assert other["success"] and other["output"] == "fresh", other


@local_backend_only
def test_the_next_start_removes_a_killed_executors_pool_dir_and_never_a_live_ones(
    executor_factory: Factory, state_dir: Path
) -> None:
    def start() -> ExecutorServer:
        return executor_factory(state_dir=state_dir, pool_in_state_dir=True, env=settings())

    killed, live = start(), start()
    killed_dir = Path(killed.status()["pool"]["backend"]["data_dir"])
    live_dir = Path(live.status()["pool"]["backend"]["data_dir"])
    for pool_dir in (killed_dir, live_dir):
        assert pool_dir.parent == state_dir.resolve() and pool_dir.name.startswith("pool-")
    assert killed_dir != live_dir
    assert live.sh("pool-live", "echo kept > keep.txt && echo ok")["success"]
    assert killed.sh("pool-killed", "echo gone > gone.txt && echo ok")["success"]
    pids = sandbox_pids(killed)

    stop_with(killed, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 15, "its sandboxes to exit")
    assert killed_dir.is_dir(), "a killed executor cannot remove its own pool dir"

    following = start()
    assert not killed_dir.exists()
    assert f"event=stale_pool_removed path={killed_dir}" in following.log()
    assert live_dir.is_dir()
    kept = live.sh("pool-live", "cat keep.txt")
    assert kept["success"] and kept["output"] == "kept", kept


def test_a_second_executor_of_the_same_identity_is_refused(
    executor_factory: Factory, state_dir: Path, nomad: NomadDouble | None
) -> None:
    port = free_port()
    first = executor_factory(port=port, state_dir=state_dir, nomad=nomad, env=settings())
    second = executor_factory(
        port=port, state_dir=state_dir, nomad=nomad, env=settings(), wait=False
    )
    assert second.process.wait(timeout=60) != 0
    assert "another executor with the same identity uses the lease journal" in second.log()
    assert first.sh("identity-first", "echo still here")["output"] == "still here"


@local_backend_only
def test_an_explicit_data_dir_is_claimed_and_its_leftovers_removed(
    executor_factory: Factory,
) -> None:
    with temporary_dir() as data:
        (data / "sandbox-7").mkdir()
        (data / "sandbox-7" / "old.txt").write_text("from a dead executor")
        (data / "sandbox-7.log").write_text("from a dead executor")
        (data / "notes.txt").write_text("not the executor's")
        first = executor_factory(env=settings(sandbox_data_dir=str(data)))
        assert not (data / "sandbox-7").exists() and not (data / "sandbox-7.log").exists()
        assert (data / "notes.txt").exists()
        assert f"event=stale_pool_removed path={data.resolve()} entries=2" in first.log()

        second = executor_factory(env=settings(sandbox_data_dir=str(data)), wait=False)
        assert second.process.wait(timeout=60) != 0
        assert f"another executor uses the sandbox data dir {data.resolve()}" in second.log()
        assert first.sh("data-dir-first", "echo still here")["output"] == "still here"
        # Stopped before their data dir goes.
        first.stop()
        second.stop()
