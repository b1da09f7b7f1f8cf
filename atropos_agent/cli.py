"""``atropos-tool-executor``: ``serve`` runs the executor service, ``sandbox`` a sandbox server,
``bench`` loads a service and reports its figures, ``status`` shows a service's state."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from atropos_agent import serving
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.web import describe_settings_error


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
    serving.log_events(args.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    try:
        settings = ExecutorSettings(**overrides)
    except ValidationError as exc:
        reason = describe_settings_error(exc, "TOOL_EXECUTOR_")
        sys.exit(f"atropos-tool-executor: invalid setting: {reason}")
    from atropos_agent.executor.app import create_app

    serving.run(
        create_app(settings),
        settings.host,
        settings.port,
        settings.connections(),
        log_level=args.log_level,
        access_log=False,
        # The executor answers calls in flight when its grace ends (Executor.begin_shutdown);
        # this is the server's own backstop a second later.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s + 1.999),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: atropos-tool-executor {serve,sandbox,bench,status} [options]\n\n"
            "  serve     run the executor service (trainers talk to this)\n"
            "  sandbox   run one sandbox server (what each container runs)\n"
            "  bench     load a service (or one it starts) and report calls/s and latency\n"
            "  status    show a service's pool, leases, latency and recent errors"
        )
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    elif command == "sandbox":
        from atropos_agent.sandbox.__main__ import main as sandbox_main

        sandbox_main(rest)
    elif command == "bench":
        from atropos_agent.bench.command import main as bench_main

        bench_main(rest)
    elif command == "status":
        from atropos_agent.status_view import main as status_main

        status_main(rest)
    else:
        sys.exit(
            f"atropos-tool-executor: unknown command {command!r} (serve, sandbox, bench, status)"
        )


if __name__ == "__main__":
    main()
