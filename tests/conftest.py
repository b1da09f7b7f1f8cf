"""Fixtures that start real servers on loopback (real bubblewrap, real slot agents).

How they start, and what the servers offer, is ``harness.servers``; every server is stopped
and its directory removed when its fixture ends. A run leaves nothing in the temporary
directory: ``tmp_path`` directories live under a directory of the run's own, removed at its end
(unless ``--basetemp`` names one to keep).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.nomad_double import NomadDouble
from harness.servers import (
    ExecutorServer,
    SandboxServer,
    start_executor,
    start_nomad_double,
    start_sandbox,
)

# The base directory of ``tmp_path`` this run made, to remove when it ends.
OWN_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Put ``tmp_path`` directories under a new directory of this run's own (instead of
    pytest's default, which keeps the last three runs' under ``/tmp/pytest-of-<user>``)."""
    if config.option.basetemp is None:
        config.option.basetemp = config.stash[OWN_BASETEMP] = tempfile.mkdtemp(
            prefix="atropos-pytest-"
        )
    # Hypothesis keeps caches (and a database, where a test keeps one) in ./.hypothesis: under
    # the run's directory instead, so that a run leaves nothing in the work tree either.
    os.environ.setdefault(
        "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(config.option.basetemp, "hypothesis")
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    basetemp = config.stash.get(OWN_BASETEMP, None)
    if basetemp is not None:
        shutil.rmtree(basetemp, ignore_errors=True)


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


@pytest.fixture
def double() -> Iterator[NomadDouble]:
    """A Nomad API double for one test; it must have hit no internal error of its own."""
    nomad = start_nomad_double()
    yield nomad
    nomad.close()
    assert not nomad.internal_errors, nomad.internal_errors
