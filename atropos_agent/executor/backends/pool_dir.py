"""The local pool's data directory: claimed by a lock for as long as its executor or any of its
sandboxes lives, and removed once they are all gone.

Without ``TOOL_EXECUTOR_SANDBOX_DATA_DIR`` each executor makes ``pool-XXXXXXXX`` under its
state directory and removes it when it stops. An executor that was killed cannot, so each
start first removes every ``pool-*`` directory whose lock it can take: nobody holds it, so its
executor and sandboxes are dead. The lock is a file inside the directory, held by the executor
and handed to every sandbox it starts (``pass_fds``), so a directory stays claimed until its
last process is gone. A directory whose lock is held is never touched.

With an explicit data dir the lock is the same: held by a live executor, this one refuses to
start; free, the ``sandbox-*`` entries a dead one left are removed first.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from atropos_agent.errors import BackendError
from atropos_agent.executor.state_dir import FileLock, open_state_dir

log = logging.getLogger("atropos.backend.local")

LOCK_NAME = "executor.lock"
PREFIX = "pool-"
# A new directory is made under this name and renamed to PREFIX... once its lock is held, so
# that no other executor's clean-up can take it for a dead one in between.
STARTING_PREFIX = ".starting-pool-"
# What the local backend writes into a data dir: sandbox-N/ and sandbox-N.log.
SANDBOX_ENTRIES = "sandbox-*"


@dataclass
class PoolDir:
    path: Path
    lock: FileLock
    # Made by this executor: removed on a graceful stop.
    owned: bool

    def release(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.close()


def claim_pool_dir(state_dir: Path, data_dir: Path | None) -> PoolDir:
    """The explicit ``data_dir`` claimed, or a new directory of this executor's under
    ``state_dir``; either way after removing those of dead executors. Raises BackendError."""
    state_dir = open_state_dir(state_dir)
    remove_dead_pool_dirs(state_dir)
    if data_dir is not None:
        return claim_explicit(Path(data_dir).resolve())
    try:
        starting = Path(tempfile.mkdtemp(prefix=STARTING_PREFIX, dir=state_dir))
        lock = FileLock.take(starting / LOCK_NAME)
        assert lock is not None, "a directory nobody else knows yet"
        path = state_dir / (PREFIX + starting.name.removeprefix(STARTING_PREFIX))
        starting.rename(path)
    except OSError as exc:
        raise BackendError(f"cannot make a pool directory in {state_dir}: {exc}") from None
    lock.path = path / LOCK_NAME
    return PoolDir(path.resolve(), lock, owned=True)


def remove_dead_pool_dirs(state_dir: Path) -> None:
    for path in sorted(state_dir.glob(PREFIX + "*")):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            lock = FileLock.take(path / LOCK_NAME)
        except OSError:
            continue  # removed by another executor's clean-up meanwhile
        if lock is None:
            continue  # a live executor's, or its sandboxes are still stopping
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.close()
        log.info("event=stale_pool_removed path=%s", path)


def claim_explicit(path: Path) -> PoolDir:
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock.take(path / LOCK_NAME)
    except OSError as exc:
        raise BackendError(
            f"cannot use the sandbox data dir {path} (TOOL_EXECUTOR_SANDBOX_DATA_DIR): {exc}"
        ) from None
    if lock is None:
        raise BackendError(
            f"another executor uses the sandbox data dir {path} (TOOL_EXECUTOR_SANDBOX_DATA_DIR; "
            f"its lock {path / LOCK_NAME} is held): stop it first, or give this executor a "
            "data dir of its own"
        )
    leftovers = sorted(path.glob(SANDBOX_ENTRIES))
    for entry in leftovers:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if leftovers:
        log.info("event=stale_pool_removed path=%s entries=%d", path, len(leftovers))
    return PoolDir(path, lock, owned=False)
