"""What runs on this host: to check that nothing a server started outlived it."""

from __future__ import annotations

import os
from pathlib import Path


def host_processes_matching(text: str) -> list[str]:
    """Command lines of host processes containing ``text`` (this process excluded)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if text in cmdline:
            found.append(cmdline)
    return found
