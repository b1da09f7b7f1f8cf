"""``python -m atropos_agent.sandbox`` / ``atropos-sandbox``: run one sandbox server."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from pydantic import ValidationError

from atropos_agent import serving
from atropos_agent.errors import IsolationUnavailable, SandboxStartError
from atropos_agent.sandbox import mounts
from atropos_agent.sandbox.app import create_app
from atropos_agent.sandbox.settings import SandboxSettings
from atropos_agent.web import describe_settings_error

# How often the parent is looked for, and how long a graceful stop may take once it is gone.
PARENT_POLL_S = 1.0
PARENT_GONE_STOP_S = 30.0

FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "address to listen on (default 127.0.0.1)"),
    ("--port", "port", int, "port (default 8080; NOMAD_PORT_http when set)"),
    ("--slots", "slots", int, "number of slots (default 10)"),
    ("--warm-slots", "warm_slots", int, "free slots kept started ahead of demand (default 32)"),
    (
        "--data-dir",
        "data_dir",
        str,
        "where workspaces live (default $NOMAD_ALLOC_DIR/data or a temp dir)",
    ),
    ("--isolation", "isolation", str, "bwrap (default) or none (no sandbox: development only)"),
    (
        "--default-timeout",
        "default_timeout_s",
        float,
        "seconds a command may run when none is asked",
    ),
    ("--max-timeout", "max_timeout_s", float, "largest timeout honoured, seconds (default 600)"),
    ("--memory-mb", "memory_mb", int, "address space per command (default 2048)"),
    ("--max-processes", "max_processes", int, "processes per slot (default 256)"),
    ("--max-output-bytes", "max_output_bytes", int, "output kept per command, head + tail"),
    ("--max-file-bytes", "max_file_bytes", int, "largest file read or write (default 5 MiB)"),
    ("--disk-mb", "disk_mb", int, "workspace + /tmp bound per slot (default 1024)"),
    ("--max-request-bytes", "max_request_bytes", int, "largest request body (default 32 MiB)"),
    ("--upload-max-mb", "upload_max_mb", int, "largest upload, body and extracted (default 1024)"),
    ("--upload-max-entries", "upload_max_entries", int, "most entries of an upload (200000)"),
    ("--slot-uid-base", "slot_uid_base", int, "first host uid for slots when run as root"),
    (
        "--workspace-layers",
        "workspace_layers",
        str,
        "auto (default), overlay (copy-on-write, or refuse to start) or copy",
    ),
    ("--layer-cache-mb", "layer_cache_mb", int, "disk for workspace layers (default 8192)"),
    ("--job-timeout", "job_timeout_s", float, "background job timeout, default and most (300)"),
    (
        "--terminal-output",
        "terminal_output",
        str,
        "split (default: stdout, then [stderr] and stderr) or merged (one interleaved stream)",
    ),
]


def parse_args(argv: list[str] | None) -> tuple[dict[str, Any], str]:
    parser = argparse.ArgumentParser(
        prog="atropos-sandbox",
        description="Sandbox server: S isolated slots behind HTTP. Every flag also reads "
        "ATROPOS_SANDBOX_<NAME> from the environment or a .env file; the shared token is "
        "read from ATROPOS_SANDBOX_TOKEN only, so that it never shows in a process list.",
    )
    for flag, dest, kind, text in FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    network = parser.add_mutually_exclusive_group()
    network.add_argument(
        "--allow-network",
        dest="allow_network",
        action="store_true",
        default=None,
        help="commands may use the network (default)",
    )
    network.add_argument(
        "--no-network",
        dest="allow_network",
        action="store_false",
        help="commands get only a private loopback interface",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the executor that started us) dies",
    )
    args = vars(parser.parse_args(argv))
    log_level = args.pop("log_level")
    parent_pid = args.pop("parent_pid")
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    return {key: value for key, value in args.items() if value is not None}, log_level


def exit_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when the parent dies, so a killed executor leaves no sandbox behind.

    The kernel's signal (``PR_SET_PDEATHSIG``) can be missed: it follows the parent thread
    that started us, and a SIGTERM that lands while the server is between its own start-up
    and its handlers is lost. So a thread also watches the parent, and stops the server the
    same way when it is gone, then for good if a graceful stop does not end it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        sys.exit("atropos-sandbox: parent process is gone")
    threading.Thread(
        target=watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
    ).start()


def watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    logging.getLogger("atropos.sandbox").warning("event=parent_gone parent_pid=%d", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(PARENT_GONE_STOP_S)
    os._exit(1)  # the graceful stop did not end us: the slots die with us (bwrap's die-with-parent)


def main(argv: list[str] | None = None) -> None:
    # First, while this process has one thread: a mount namespace of its own, so that the
    # workspaces it mounts never show on the host and die with it (``mounts.py``).
    mounts.enter_private_namespace()
    overrides, log_level = parse_args(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = SandboxSettings(**overrides)
    except ValidationError as exc:
        reason = describe_settings_error(exc, "ATROPOS_SANDBOX_")
        sys.exit(f"atropos-sandbox: invalid setting: {reason}")
    app = create_app(settings)
    try:
        app.state.sandbox.prepare()
    except (IsolationUnavailable, SandboxStartError) as exc:
        sys.exit(f"atropos-sandbox: cannot start: {exc}")
    # The standard event loop: slots start their agents as other uids (user=/group= of
    # asyncio's subprocess API), which uvloop does not offer.
    serving.run(
        app,
        settings.host,
        settings.port,
        # Longer than the executor's idle keep-alive (executor/transport.py), so that it never
        # reuses a connection this server is closing at that moment.
        serving.ConnectionBounds(keep_alive_s=60),
        log_level=log_level,
        access_log=False,
        loop="asyncio",
        # A stopping sandbox's slots go with it: commands still running after this are ended
        # (the executor has answered their calls by then, or will as the sandbox goes).
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
