"""Backends: how sandboxes are started, found and stopped; nothing else."""

from __future__ import annotations

from atropos_agent.errors import BackendError
from atropos_agent.executor.backends.base import Backend
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.executor.transport import Transport


def create_backend(settings: ExecutorSettings, transport: Transport) -> Backend:
    """The configured backend; ``transport`` reaches its sandboxes (to see them start)."""
    if settings.backend == "local":
        from atropos_agent.executor.backends.local import LocalBackend

        return LocalBackend(settings.local(), transport)
    if settings.backend == "nomad":
        from atropos_agent.executor.backends.nomad import NomadBackend

        return NomadBackend(settings.nomad(), transport)
    raise BackendError(f"unknown backend {settings.backend!r} (local, nomad)")
