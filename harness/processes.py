"""What runs on this host: to check that nothing a server started outlived it, and what a
command in a slot can reach."""

from __future__ import annotations

import os
import random
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


# Python for a slot's `python` tool: tries 127.0.0.1:{port} and prints "connected" or
# "refused <reason>" (what a slot's network namespace lets it reach).
CONNECT_PROBE = (
    "import socket\n"
    "s = socket.socket()\n"
    "s.settimeout(3)\n"
    "try:\n"
    "    s.connect(('127.0.0.1', {port}))\n"
    "    print('connected')\n"
    "except OSError as exc:\n"
    "    print('refused', exc)\n"
)


def unique_sleep() -> str:
    """A ``sleep`` command line no other test (or run) has: findable with
    ``host_processes_matching``."""
    return f"sleep 30.{random.randrange(10**6):06d}"
