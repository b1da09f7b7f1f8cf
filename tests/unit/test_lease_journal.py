"""The lease journal on its own: rows written and deleted, the bound, what a reopened journal
recalls, one live journal per identity; and the state directory it lives in."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from atropos_agent.errors import BackendError
from atropos_agent.executor import lease_journal
from atropos_agent.executor.lease_journal import LeaseJournal, journal_path
from atropos_agent.executor.settings import JournalSettings
from atropos_agent.executor.state_dir import open_state_dir


def rows(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT trajectory_id, sandbox_id, slot_id FROM leases ORDER BY rowid")
        return [tuple(row) for row in found]


def test_recorded_leases_are_recalled_until_forgotten(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "state", "local-9001")
    journal = LeaseJournal(path, limit=100)
    assert journal.open() == []
    journal.record("traj-a", "local-0-1", "slot_0")
    journal.record("traj-b", "local-0-1", "slot_1")
    journal.record("traj-c", "local-1-2", "slot_0")
    journal.forget("traj-b")
    journal.forget("never-leased")
    assert rows(path) == [("traj-a", "local-0-1", "slot_0"), ("traj-c", "local-1-2", "slot_0")]
    journal.close()

    reopened = LeaseJournal(path, limit=100)
    assert reopened.open() == ["traj-a", "traj-c"]
    # Recalled rows stay until the trainer releases them.
    assert reopened.rows == 2
    reopened.forget("traj-a")
    reopened.close()
    again = LeaseJournal(path, limit=100)
    assert again.open() == ["traj-c"]
    again.close()


def test_the_journal_keeps_at_most_its_limit_dropping_the_oldest(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "state", "local-9001")
    journal = LeaseJournal(path, limit=3)
    journal.open()
    for name in ("t1", "t2", "t3", "t4", "t5"):
        journal.record(name, "local-0-1", "slot_0")
    # A replaced row counts once: the table is recounted before anything is dropped.
    journal.record("t5", "local-0-2", "slot_1")
    assert [row[0] for row in rows(path)] == ["t3", "t4", "t5"]
    assert journal.rows == 3
    journal.close()


def test_a_second_journal_of_the_same_identity_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = LeaseJournal(journal_path(state, "local-9001"), limit=10)
    first.open()
    second = LeaseJournal(journal_path(state, "local-9001"), limit=10)
    with pytest.raises(BackendError, match="another executor with the same identity"):
        second.open()
    other = LeaseJournal(journal_path(state, "local-9002"), limit=10)
    assert other.open() == []
    other.close()
    first.close()
    # Once the first is closed its lock is free.
    assert second.open() == []
    second.close()


def test_journal_files_are_private_and_named_by_identity(tmp_path: Path) -> None:
    settings = JournalSettings(state_dir=tmp_path / "state", identity="nomad-my/job")
    journal = LeaseJournal.configured(settings, limit=10)
    assert journal.path == tmp_path / "state" / "leases-nomad-my_job.sqlite"
    journal.open()
    journal.record("t", "alloc-1", "slot_0")
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o711
    journal.close()
    in_memory = LeaseJournal.configured(JournalSettings(tmp_path / "x", None), limit=10)
    assert in_memory.path is None and in_memory.open() == []
    in_memory.record("t", "local-0-1", "slot_0")
    in_memory.close()
    assert not (tmp_path / "x").exists()


def test_checkpoints_run_off_the_caller_and_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease_journal, "CHECKPOINT_EVERY", 10)
    path = journal_path(tmp_path / "state", "local-9001")
    journal = LeaseJournal(path, limit=1000)
    journal.open()
    for index in range(95):
        journal.record(f"t{index}", "local-0-1", "slot_0")
    assert journal.checkpoint is not None
    journal.close()
    assert len(rows(path)) == 95


def test_a_damaged_journal_stops_the_start_saying_which_file(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "state", "local-9001")
    path.parent.mkdir()
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(BackendError, match=r"cannot open the lease journal .*remove it"):
        LeaseJournal(path, limit=10).open()


def test_a_state_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BackendError, match="not a directory but a link"):
        open_state_dir(tmp_path / "state")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another uid takes root")
def test_a_state_dir_of_another_uid_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(BackendError, match="belongs to uid 65534"):
        open_state_dir(state)
