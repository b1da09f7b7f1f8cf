"""A Nomad HTTP API test double: server, scheduler and one raw_exec client in-process.

Laid out like Nomad's own ``api/`` package, one resource per module: ``server`` (routing,
ACL, blocking-query headers), ``jobs``, ``allocations``, ``scaling``, ``evaluations``,
``variables``, ``services``, ``status``; ``scheduler`` and ``node``/``tasks`` play the
server and the client agent. ``double.NomadDouble`` ties them together and ``fixtures``
offers pytest fixtures.
"""

from .double import NomadDouble

__all__ = ["NomadDouble"]
