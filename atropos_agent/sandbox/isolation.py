"""How a slot's agent is launched: under bubblewrap, or (only when asked for) without isolation.

There is no silent fallback: in ``bwrap`` mode the server refuses to start when bubblewrap does
not work here, and says how to fix it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atropos_agent.errors import IsolationUnavailable
from atropos_agent.sandbox.agent.workspace import WORKSPACE_IN_SLOT
from atropos_agent.sandbox.settings import SandboxSettings

# Where a slot sees the agent's runtime directory (``runtime.py``), read-only.
RUNTIME_IN_SLOT = "/run/atropos"
# Where a slot on an overlay workspace sees the overlay's upper directory (its own changes,
# which its disk bound counts), read-only.
CHANGES_IN_SLOT = "/run/atropos-changes"
# System directories a command sees, read-only. Merged-/usr hosts have symlinks for most.
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")
# The identity commands have inside the slot's user namespace (not root: no capabilities).
UID_IN_SLOT = 1000
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SlotPaths:
    root: Path
    workspace: Path
    tmp: Path
    # Where the slot sees its own changes on a copy-on-write workspace (``layered.py``), bound
    # read-only at CHANGES_IN_SLOT; None where workspaces are copies.
    changes: Path | None = None


@dataclass(frozen=True)
class DiskBound:
    """What a slot's disk bound counts when its workspace is made of layers (``layered.py``):
    only its own changes. On an overlay they are in the changes directory (``counts_changes``);
    on a copy, they are what the workspace holds beyond the ``baseline_bytes`` the copy took."""

    counts_changes: bool = False
    baseline_bytes: int = 0


def disk_config(
    settings: SandboxSettings, paths: SlotPaths, disk: DiskBound | None
) -> dict[str, Any]:
    """The agent's config keys for ``disk`` (none: the bound counts the whole workspace)."""
    measured: dict[str, Any] = {}
    if disk is not None and disk.counts_changes and paths.changes is not None:
        isolated = settings.isolation == "bwrap"
        measured["disk_root"] = CHANGES_IN_SLOT if isolated else str(paths.changes)
    if disk is not None and disk.baseline_bytes:
        measured["disk_baseline_bytes"] = disk.baseline_bytes
    return measured


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    uid: int | None
    cwd: str


def agent_config(
    settings: SandboxSettings,
    paths: SlotPaths,
    network: bool | None = None,
    disk: DiskBound | None = None,
) -> dict[str, Any]:
    # ``network``: the launch's network mode (None: the server's); see ``bwrap_prefix``.
    isolated = settings.isolation == "bwrap"
    root = WORKSPACE_IN_SLOT if isolated else str(paths.workspace)
    tmp = "/tmp" if isolated else str(paths.tmp)
    return {
        **disk_config(settings, paths, disk),
        "root": root,
        "scratch": [tmp],
        "shell": settings.slot_shell(),
        "python": settings.slot_python(),
        "max_output_bytes": settings.max_output_bytes,
        "max_file_bytes": settings.max_file_bytes,
        "disk_bytes": settings.disk_bytes,
        "max_processes": settings.max_processes,
        "memory_bytes": settings.memory_bytes,
        "job_timeout_s": settings.job_timeout_s,
        # How commands answer: stdout and stderr apart ("split") or interleaved ("merged").
        "terminal_output": settings.terminal_output,
        # Reported in every command's metadata, as the old service did.
        "sandboxed": isolated,
        # True when this agent runs in a private network namespace (``--unshare-net``).
        "network_isolated": isolated and not (settings.allow_network and network is not False),
        "env": {
            "PATH": PATH,
            "HOME": root,
            "TMPDIR": tmp,
            # tmux puts its socket under TMUX_TMPDIR, else the real /tmp (isolation none).
            "TMUX_TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "USER": "sandbox",
        },
    }


def system_mounts() -> list[str]:
    args: list[str] = []
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):
            args += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    return args


def bwrap_prefix(
    settings: SandboxSettings, paths: SlotPaths, runtime_dir: Path, network: bool | None = None
) -> list[str]:
    """The bubblewrap command line of a slot; ``network`` False gives it only a private
    loopback (``--unshare-net``). None: the server's setting. A call can only narrow the
    server's setting, never widen it."""
    bwrap = shutil.which("bwrap") or "bwrap"
    allowed = settings.allow_network and network is not False
    unshare_net = [] if allowed else ["--unshare-net"]
    changes = [] if paths.changes is None else ["--ro-bind", str(paths.changes), CHANGES_IN_SLOT]
    return [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *unshare_net,
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        *system_mounts(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--bind",
        str(paths.workspace),
        WORKSPACE_IN_SLOT,
        "--bind",
        str(paths.tmp),
        "/tmp",
        "--ro-bind",
        str(runtime_dir),
        RUNTIME_IN_SLOT,
        *changes,
        "--chdir",
        WORKSPACE_IN_SLOT,
        "--clearenv",
        "--setenv",
        "PATH",
        PATH,
        "--uid",
        str(UID_IN_SLOT),
        "--gid",
        str(UID_IN_SLOT),
        "--hostname",
        "sandbox",
    ]


def launch_for(
    settings: SandboxSettings,
    uid: int | None,
    paths: SlotPaths,
    runtime_dir: Path,
    network: bool | None = None,
    disk: DiskBound | None = None,
) -> Launch:
    """How to start a slot's agent; ``uid`` is its host uid (None: the server's own),
    ``network`` the network mode it runs in (None: the server's; see ``bwrap_prefix``), and
    ``disk`` what its disk bound counts (None: its workspace).

    The agent is the runtime directory run as a program (``runtime.py``): ``-I`` keeps the
    environment and user site out, ``-S`` skips ``site`` (nothing of it is needed, and every
    slot would carry it).
    """
    config = json.dumps(agent_config(settings, paths, network, disk))
    python = settings.slot_python()
    if settings.isolation == "bwrap":
        argv = [
            *bwrap_prefix(settings, paths, runtime_dir, network),
            python,
            "-I",
            "-S",
            RUNTIME_IN_SLOT,
            config,
        ]
    else:
        argv = [python, "-I", "-S", str(runtime_dir), config]
    return Launch(argv=argv, uid=uid, cwd=str(paths.workspace))


def probe_bwrap(
    settings: SandboxSettings, uid: int | None, paths: SlotPaths, runtime_dir: Path
) -> None:
    """Start one throw-away sandbox with the exact flags slots use; raise with a fix if it fails."""
    if shutil.which("bwrap") is None:
        raise IsolationUnavailable(
            "bubblewrap is not installed: install it (apt-get install bubblewrap), "
            "or start with --isolation none to run commands WITHOUT isolation (unsafe)"
        )
    argv = [*bwrap_prefix(settings, paths, runtime_dir), "/bin/sh", "-c", "exit 0"]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            env={},
            user=uid,
            group=uid,
            extra_groups=[] if uid is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationUnavailable(f"bubblewrap could not be run: {exc}") from exc
    if done.returncode != 0:
        raise IsolationUnavailable(
            f"bubblewrap does not work here (exit {done.returncode}: {done.stderr.strip()}). "
            "It needs unprivileged user namespaces: check `sysctl user.max_user_namespaces` "
            "(> 0) and, on Debian/Ubuntu, `sysctl kernel.unprivileged_userns_clone=1` or the "
            "AppArmor userns restriction; inside Docker run the container privileged or with "
            "seccomp and AppArmor profiles that allow unshare/mount (see docs/operations.md). "
            "Or start with --isolation none to run commands WITHOUT isolation (unsafe)."
        )
