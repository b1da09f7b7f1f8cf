"""Host uids for slots, when the server runs as root.

Slot N of a server runs as its own unprivileged host uid, so that slots cannot touch each
other's files or processes and each has its own process count. Several sandbox servers may
share a host (the local backend runs several; so can operators), so each server *claims* a
range of uids for its lifetime with ``flock`` on small lock files, starting from the preferred
base and moving up past ranges other servers hold. The kernel drops the locks when the server
exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from atropos_agent.errors import SandboxStartError

LOCK_DIR = Path("/run/atropos-sandbox/uids")
MAX_RANGES_SCANNED = 4096


@dataclass
class UidRange:
    base: int
    count: int
    lock_fds: list[int] = field(default_factory=list)

    def uid(self, index: int) -> int:
        return self.base + index

    def release(self) -> None:
        for fd in self.lock_fds:
            os.close(fd)
        self.lock_fds.clear()


def claim(preferred_base: int, count: int, lock_dir: Path = LOCK_DIR) -> UidRange:
    """Lock ``count`` consecutive uids: from ``preferred_base``, or the first free range above.

    One lock file per uid, so servers with different bases and slot counts never overlap.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for start in range(preferred_base, preferred_base + count * MAX_RANGES_SCANNED, count):
        held: list[int] = []
        for uid in range(start, start + count):
            fd = os.open(lock_dir / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break
            held.append(fd)
        if len(held) == count:
            return UidRange(start, count, held)
        for fd in held:
            os.close(fd)
    raise SandboxStartError(
        f"no free range of {count} slot uids from {preferred_base}: "
        f"{MAX_RANGES_SCANNED} ranges are held by other sandbox servers"
    )
