"""A sandbox that does not become healthy says why: its exit status and its log's last lines,
or that it still runs and which timeout ran out. Real sandbox processes, started by the local
backend as the executor starts them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from atropos_agent.errors import BackendError
from atropos_agent.executor.backends.local import LocalBackend
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.executor.transport import AiohttpTransport
from harness.servers import temporary_dir


def start_failure(state_dir: Path, start_timeout_s: float, **sandbox_env: str) -> str:
    """The error of a local backend starting one sandbox with ``sandbox_env`` over its own."""
    local = ExecutorSettings(
        _env_file=None, state_dir=state_dir, slots=1, sandbox_start_timeout_s=start_timeout_s
    ).local()
    local = replace(local, sandbox_env={**local.sandbox_env, **sandbox_env})

    async def start() -> str:
        transport = AiohttpTransport()
        backend = LocalBackend(local, transport)
        try:
            with pytest.raises(BackendError) as failed:
                await asyncio.wait_for(backend.start(1), start_timeout_s + 30)
            # Nothing is left running: the failed start stopped its sandbox.
            assert backend.children == {}
            return failed.value.message
        finally:
            await backend.stop()
            await transport.close()

    return asyncio.run(start())


def test_a_sandbox_that_exits_at_start_names_its_status_and_its_last_log_line() -> None:
    with temporary_dir() as state_dir:
        message = start_failure(state_dir, 30, ATROPOS_SANDBOX_TERMINAL_OUTPUT="bogus")
    assert "sandbox 0 did not start" in message
    assert "it exited with status 1" in message
    assert "ATROPOS_SANDBOX_TERMINAL_OUTPUT" in message.split("ends:\n", 1)[1], message


def test_a_sandbox_not_healthy_in_time_says_it_still_runs_and_what_to_raise() -> None:
    with temporary_dir() as state_dir:
        message = start_failure(state_dir, 0.2)
    assert "not healthy after 0.2s (last: sandbox at" in message
    assert "still running (pid " in message
    assert "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S" in message
    # Its log is named whether or not it holds anything yet; no reason is left blank.
    assert "its log sandbox-0.log " in message
    assert not message.rstrip().endswith((":", "()")), message
