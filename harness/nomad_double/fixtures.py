"""pytest fixtures for the Nomad test double.

Use them from a test module with ``pytest_plugins = ["harness.nomad_double.fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .double import NomadDouble


@pytest.fixture
def nomad_double() -> Iterator[NomadDouble]:
    """A started double without ACLs; closed (every process killed) after the test."""
    double = NomadDouble().start()
    try:
        yield double
    finally:
        double.close()
    assert not double.internal_errors, double.internal_errors[0]


@pytest.fixture
def nomad_double_factory() -> Iterator[Callable[..., NomadDouble]]:
    """Start doubles with chosen constructor arguments; all are closed after the test."""
    started: list[NomadDouble] = []

    def factory(*args: Any, **kwargs: Any) -> NomadDouble:
        double = NomadDouble(*args, **kwargs).start()
        started.append(double)
        return double

    try:
        yield factory
    finally:
        for double in started:
            double.close()
    for double in started:
        assert not double.internal_errors, double.internal_errors[0]
