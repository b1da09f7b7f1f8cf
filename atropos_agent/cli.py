"""``atropos-tool-executor``: ``serve`` runs the executor service, ``sandbox`` a sandbox server."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.web import describe_settings_error

KEEP_ALIVE_S = 75
GRACEFUL_SHUTDOWN_S = 15


def serve(argv: list[str]) -> None:
    fields = ExecutorSettings.model_fields
    parser = argparse.ArgumentParser(
        prog="atropos-tool-executor serve",
        description="Run the executor service. Settings come from TOOL_EXECUTOR_* variables "
        "and a .env file (see docs/configuration.md); these flags override a few. A flag "
        "left out takes its variable, else the default shown.",
    )
    parser.add_argument(
        "--host",
        default=None,
        help=f"address to listen on (TOOL_EXECUTOR_HOST; default {fields['host'].default})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port to listen on (TOOL_EXECUTOR_PORT; default {fields['port'].default})",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "nomad"],
        default=None,
        help="where sandboxes run: local child processes on this machine, or Nomad jobs "
        f"(TOOL_EXECUTOR_BACKEND; default {fields['backend'].default})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
        help="least severe log level printed (default info)",
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "log_level"}
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    try:
        settings = ExecutorSettings(**overrides)
    except ValidationError as exc:
        reason = describe_settings_error(exc, "TOOL_EXECUTOR_")
        sys.exit(f"atropos-tool-executor: invalid setting: {reason}")
    from atropos_agent.executor.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,
        # Longer than clients' idle keep-alive, so that a client never reuses a connection the
        # server is closing at that moment (a race that fails the request).
        timeout_keep_alive=KEEP_ALIVE_S,
        # On SIGTERM, calls in flight get this long; then the pool is stopped regardless.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: atropos-tool-executor {serve,sandbox} [options]\n\n"
            "  serve     run the executor service (trainers talk to this)\n"
            "  sandbox   run one sandbox server (what each container runs)"
        )
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    elif command == "sandbox":
        from atropos_agent.sandbox.__main__ import main as sandbox_main

        sandbox_main(rest)
    else:
        sys.exit(f"atropos-tool-executor: unknown command {command!r} (serve, sandbox)")


if __name__ == "__main__":
    main()
