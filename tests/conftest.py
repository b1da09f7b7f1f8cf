"""Fixtures that start real servers on loopback (real bubblewrap, real slot agents).

How they start, and what the servers offer, is ``harness.servers``; every server is stopped
and its directory removed when its fixture ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.servers import ExecutorServer, SandboxServer, start_executor, start_sandbox


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., SandboxServer]]:
    """Start sandbox servers with chosen settings (``start_sandbox``); all stop after the test."""
    started: list[SandboxServer] = []

    def factory(**kwargs: Any) -> SandboxServer:
        server = start_sandbox(**kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    """One shared server with default settings for a test module."""
    server = start_sandbox(slots=4)
    yield server
    server.stop()


@pytest.fixture
def executor_factory() -> Iterator[Callable[..., ExecutorServer]]:
    """Start executors with chosen settings (``start_executor``); all stop after the test."""
    started: list[ExecutorServer] = []

    def factory(**kwargs: Any) -> ExecutorServer:
        server = start_executor(**kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def executor() -> Iterator[ExecutorServer]:
    """One shared executor (1..2 sandboxes of 4 slots) for a test module."""
    server = start_executor()
    yield server
    server.stop()
