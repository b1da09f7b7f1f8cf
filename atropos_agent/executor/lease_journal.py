"""Which trajectories hold or held leases, on disk, so that a restarted executor can tell their
trainers that their workspace is gone.

Leases live in the executor's memory, and the workspaces behind them do not survive its
restart (docs/executor.md). Without a record, a trajectory's next call after a restart would
silently start in a new, empty workspace. So a row is written when a lease is taken and
deleted when the trainer releases the trajectory; a lease that ended by expiry or loss keeps
its row until that release, and a new executor turns every row it finds into a clear
"workspace lost" answer.

The journal is SQLite (the standard library's ``sqlite3``): each write is an atomic
transaction that survives the process being killed at any point, and there is no file format
of our own to write, parse and repair. In WAL mode with ``synchronous=NORMAL`` a write is an
append to the log without an ``fsync`` (a power cut may lose the last writes, never corrupt
the file), cheap enough to make on the event loop: tens of microseconds per lease
(docs/executor.md). Copying the log back into the file (a checkpoint) does ``fsync``, which
takes milliseconds on a disk, so it runs on a thread of the journal's own every
``CHECKPOINT_EVERY`` writes, never on the event loop. A sibling lock file keeps a second live
executor of the same identity (same address, or same Nomad job) from sharing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from atropos_agent.errors import BackendError
from atropos_agent.executor.settings import JournalSettings
from atropos_agent.executor.state_dir import FileLock, open_state_dir

log = logging.getLogger("atropos.executor.journal")

# Writes between two checkpoints: the log then stays at a few MiB.
CHECKPOINT_EVERY = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    trajectory_id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    slot_id TEXT NOT NULL,
    leased_at REAL NOT NULL
)
"""


def journal_path(state_dir: Path, identity: str) -> Path:
    """``<state_dir>/leases-<identity>.sqlite``, the identity made safe for a file name."""
    return state_dir / f"leases-{re.sub(r'[^A-Za-z0-9._-]', '_', identity)}.sqlite"


class LeaseJournal:
    """The rows of one executor identity; ``path`` None keeps them in memory (nothing to
    recall after a restart, for an executor that is never started again at the same
    address). Holds at most ``limit`` rows: beyond it the oldest are dropped."""

    def __init__(self, path: Path | None, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.lock: FileLock | None = None
        self.db: sqlite3.Connection | None = None
        # Rows in the table, counted here so that a write need not ask SQLite.
        self.rows = 0
        self.writes = 0
        self.checkpointer: ThreadPoolExecutor | None = None
        self.checkpoint: Future[None] | None = None

    @classmethod
    def configured(cls, settings: JournalSettings, limit: int) -> LeaseJournal:
        if settings.identity is None:
            return cls(None, limit)
        return cls(journal_path(settings.state_dir, settings.identity), limit)

    @classmethod
    def in_memory(cls, limit: int = 1_000_000) -> LeaseJournal:
        return cls(None, limit)

    def open(self) -> list[str]:
        """Claim the journal and return the trajectories a predecessor left, oldest first.

        Raises BackendError when a live executor holds it, or when it cannot be read.
        """
        if self.path is None:
            self.db = self._connect(":memory:")
            return []
        state_dir = open_state_dir(self.path.parent)
        path = state_dir / self.path.name
        lock_path = path.with_suffix(".lock")
        self.lock = FileLock.take(lock_path)
        if self.lock is None:
            raise BackendError(
                f"another executor with the same identity uses the lease journal {path} (its "
                f"lock {lock_path} is held): stop it first, or run this one on another port "
                "or Nomad job, or with another TOOL_EXECUTOR_STATE_DIR"
            )
        try:
            # Created private before SQLite opens it; its -wal and -shm files take its mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            self.db = self._connect(str(path))
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            rows = self.db.execute("SELECT trajectory_id FROM leases ORDER BY rowid").fetchall()
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise BackendError(
                f"cannot open the lease journal {path}: {exc}; if it is damaged, remove it "
                "(trainers of earlier leases then get no 'workspace lost' notice)"
            ) from None
        self.rows = len(rows)
        return [trajectory_id for (trajectory_id,) in rows]

    @property
    def claimed(self) -> bool:
        """Opened by this executor, and not yet closed."""
        return self.db is not None

    def _connect(self, where: str) -> sqlite3.Connection:
        # Autocommit: each statement is its own transaction. No other connection ever holds the
        # write lock (the checkpoint's does not take it), so a write never waits.
        db = sqlite3.connect(where, isolation_level=None, timeout=0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(SCHEMA)
        return db

    def record(self, trajectory_id: str, sandbox_id: str, slot_id: str) -> None:
        """A lease was taken."""
        if self.db is None:
            return
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                (trajectory_id, sandbox_id, slot_id, time.time()),
            )
            self.rows += 1
            if self.rows > self.limit:
                self._drop_oldest()
        except sqlite3.Error as exc:
            self._failed("record", trajectory_id, exc)
        self._wrote()

    def forget(self, trajectory_id: str) -> None:
        """The trainer released the trajectory (or the executor stopped remembering it)."""
        if self.db is None:
            return
        try:
            deleted = self.db.execute(
                "DELETE FROM leases WHERE trajectory_id = ?", (trajectory_id,)
            ).rowcount
            self.rows -= deleted
        except sqlite3.Error as exc:
            self._failed("forget", trajectory_id, exc)
        self._wrote()

    def _wrote(self) -> None:
        self.writes += 1
        if self.path is None or self.writes % CHECKPOINT_EVERY:
            return
        if self.checkpoint is not None and not self.checkpoint.done():
            return
        if self.checkpointer is None:
            self.checkpointer = ThreadPoolExecutor(1, thread_name_prefix="lease-journal")
        self.checkpoint = self.checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        """On the checkpoint thread, through a connection of its own."""
        try:
            with contextlib.closing(sqlite3.connect(str(self.path), timeout=1)) as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.error("event=lease_journal_checkpoint_failed journal=%s error=%s", self.path, exc)

    def _drop_oldest(self) -> None:
        assert self.db is not None
        # ``rows`` also counts a replaced row twice: count again before dropping.
        (self.rows,) = self.db.execute("SELECT count(*) FROM leases").fetchone()
        excess = self.rows - self.limit
        if excess > 0:
            self.db.execute(
                "DELETE FROM leases WHERE rowid IN "
                "(SELECT rowid FROM leases ORDER BY rowid LIMIT ?)",
                (excess,),
            )
            self.rows -= excess

    def _failed(self, what: str, trajectory_id: str, exc: sqlite3.Error) -> None:
        # The lease itself is fine; only the notice after a restart may be missing. A trainer's
        # call must not fail for that.
        log.error(
            "event=lease_journal_failed action=%s trajectory=%s journal=%s error=%s",
            what,
            trajectory_id,
            self.path,
            exc,
        )

    def close(self) -> None:
        """Rows stay on disk for the next executor; the lock goes."""
        if self.checkpointer is not None:
            self.checkpointer.shutdown(wait=True)
            self.checkpointer = None
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None
