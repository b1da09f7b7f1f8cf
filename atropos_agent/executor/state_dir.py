"""The executor's state directory, and the locks by which a live executor claims what is in it.

What must outlive one executor process lives under ``TOOL_EXECUTOR_STATE_DIR``: its lease
journal and the local pool's data directories. A claim is an exclusive ``flock`` on a lock
file. The kernel drops it when the last process holding the file open is gone, however that
process ended, so a lock that can be taken marks what a dead executor left, and one that
cannot marks something a live executor (or a sandbox it started) still uses: no pid files that
go stale, no guessing from timestamps.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from atropos_agent.errors import BackendError

# Others may pass (slots run as uids of their own and reach their workspaces below it), but
# neither list nor write it.
STATE_DIR_MODE = 0o711


def open_state_dir(path: Path) -> Path:
    """Create the state directory, or check the one there: a real directory of this uid.

    A symbolic link, or a directory of another uid, is refused: another user could then
    read or replace the journal and the workspaces (the default lives in the shared
    temporary directory).
    """
    path = Path(os.path.abspath(path))
    try:
        path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        found = path.lstat()
    except OSError as exc:
        raise BackendError(
            f"cannot create the state directory {path}: {exc.strerror}; set "
            "TOOL_EXECUTOR_STATE_DIR to a directory this user may write"
        ) from None
    if stat.S_ISLNK(found.st_mode) or not stat.S_ISDIR(found.st_mode):
        raise BackendError(
            f"the state directory {path} is not a directory but a link or a file; remove it, "
            "or set TOOL_EXECUTOR_STATE_DIR to another path"
        )
    if found.st_uid != os.geteuid():
        raise BackendError(
            f"the state directory {path} belongs to uid {found.st_uid}, not to this executor's "
            f"uid {os.geteuid()}; remove it, or set TOOL_EXECUTOR_STATE_DIR to another path"
        )
    path.chmod(STATE_DIR_MODE)
    return path


class FileLock:
    """An exclusive ``flock`` on ``path``, held while any process keeps ``fd`` open.

    Closing it here releases the lock only if no child was given ``fd`` (``pass_fds``).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, path: Path) -> FileLock | None:
        """The lock, or None when another open file holds it; OSError when ``path`` cannot be
        opened (its directory is gone, for instance)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
