"""Backends: how sandboxes are started, found and stopped."""

from __future__ import annotations

from atropos_agent.backends.base import Backend, BackendError
from atropos_agent.config import ExecutorSettings


def create_backend(settings: ExecutorSettings) -> Backend:
    if settings.backend == "local":
        from atropos_agent.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "nomad":
        from atropos_agent.backends.nomad import NomadBackend

        return NomadBackend(settings)
    raise BackendError(f"unknown backend {settings.backend!r} (local, nomad)")
