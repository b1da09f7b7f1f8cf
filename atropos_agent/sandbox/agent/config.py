"""What the server tells an agent at start, and the limits the agent takes on before any call.

The server passes the config as one JSON argument (``sandbox/isolation.py: agent_config``).
Limits set on the agent are inherited by every command it starts, which is how a command gets
them without a wrapper process per call.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4


class AgentConfig:
    """The slot's workspace, programs, command environment and limits, in the agent's view."""

    def __init__(self, raw: dict[str, Any]) -> None:
        # Real paths: the path jail compares resolved paths against these.
        self.root = os.path.realpath(raw["root"])
        self.scratch = [os.path.realpath(path) for path in raw.get("scratch", [])]
        self.shell: str = raw["shell"]
        self.python: str = raw.get("python") or sys.executable
        self.max_output_bytes = int(raw["max_output_bytes"])
        self.max_file_bytes = int(raw["max_file_bytes"])
        self.disk_bytes = int(raw["disk_bytes"])
        # What the disk bound counts, on a workspace made of layers: the directory holding the
        # slot's own changes (an overlay's upper, bound read-only), or what the workspace holds
        # beyond the bytes its copy took. Default: the whole workspace.
        self.disk_root = os.path.realpath(raw.get("disk_root") or raw["root"])
        self.disk_baseline_bytes = int(raw.get("disk_baseline_bytes", 0))
        self.max_processes = int(raw["max_processes"])
        self.memory_bytes = int(raw["memory_bytes"])
        # A background job's timeout: its default, and the longest a job may ask for.
        self.job_timeout_s = float(raw.get("job_timeout_s", 300.0))
        # "split": stdout, then "[stderr]" and stderr (the old service's form); "merged": both
        # streams in one pipe, as a terminal shows them (``output.py``).
        self.split_output = raw.get("terminal_output", "split") != "merged"
        # Reported in every command's metadata, as the old service did: whether the slot runs
        # under bubblewrap, and whether this agent's namespace has no network.
        self.sandboxed = bool(raw.get("sandboxed", False))
        self.network_isolated = bool(raw.get("network_isolated", False))
        # Everything a command sees of the environment: nothing of the server's leaks in.
        self.env = {str(k): str(v) for k, v in raw["env"].items()}


def apply_limits(config: AgentConfig) -> int:
    """Take on the slot's limits; returns a descriptor readable whenever a child exits."""
    resource.setrlimit(resource.RLIMIT_AS, (config.memory_bytes, config.memory_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (config.max_processes, config.max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (config.disk_bytes, config.disk_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # A write past RLIMIT_FSIZE then fails with EFBIG in the agent instead of killing it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Orphans re-parented to the agent stay zombies, counted against RLIMIT_NPROC, until
    # reaped: SIGCHLD wakes the supervision loop so a long command that keeps starting
    # short-lived daemons does not run out of processes. (Commands' handlers reset on exec.)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # Orphans of commands are re-parented to the agent, so a timeout can find and kill them.
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"agent: cannot become a child subreaper: errno {ctypes.get_errno()}")
    # Commands run as the same uid: non-dumpable, the agent cannot be ptraced by them, nor its
    # pipes to the server opened through /proc. (Each exec'd command is dumpable again.)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit(f"agent: cannot make itself non-dumpable: errno {ctypes.get_errno()}")
    return wake_r
