"""Backends: how sandboxes are started, found and stopped."""

from __future__ import annotations

from atropos_agent.executor.backends.base import Backend, BackendError
from atropos_agent.executor.settings import ExecutorSettings


def create_backend(settings: ExecutorSettings) -> Backend:
    if settings.backend == "local":
        from atropos_agent.executor.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "nomad":
        from atropos_agent.executor.backends.nomad import NomadBackend

        return NomadBackend(settings)
    raise BackendError(f"unknown backend {settings.backend!r} (local, nomad)")
