"""Pool data dirs on their own: a closed lock marks a dead executor's directory, removed by the
next claim; a held one is never touched; an explicit data dir is claimed by one executor."""

from __future__ import annotations

from pathlib import Path

import pytest

from atropos_agent.errors import BackendError
from atropos_agent.executor.backends.pool_dir import claim_pool_dir


def test_a_claim_removes_dead_pool_dirs_and_keeps_live_ones(tmp_path: Path) -> None:
    state = tmp_path / "state"
    dead, live = claim_pool_dir(state, None), claim_pool_dir(state, None)
    for pool_dir in (dead, live):
        assert pool_dir.path.parent == state and pool_dir.path.name.startswith("pool-")
        (pool_dir.path / "sandbox-0").mkdir()
    # What a killed executor leaves: its directory, with no process holding the lock.
    dead.lock.close()

    following = claim_pool_dir(state, None)
    assert not dead.path.exists()
    assert (live.path / "sandbox-0").is_dir()
    assert sorted(p.name for p in state.iterdir()) == sorted([live.path.name, following.path.name])
    live.release()
    following.release()
    assert list(state.iterdir()) == []


def test_an_explicit_data_dir_is_one_executors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sandbox-3").mkdir(parents=True)
    (data / "sandbox-3.log").write_text("a dead executor's")
    (data / "keep.txt").write_text("not the executor's")
    first = claim_pool_dir(tmp_path / "state", data)
    assert sorted(p.name for p in data.iterdir()) == ["executor.lock", "keep.txt"]
    with pytest.raises(BackendError, match="another executor uses the sandbox data dir"):
        claim_pool_dir(tmp_path / "state", data)
    first.release()
    assert data.is_dir(), "an explicit data dir is not the executor's to remove"
    claim_pool_dir(tmp_path / "state", data).release()
