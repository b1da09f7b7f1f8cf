"""The trainer-side client: the executor's routes as methods, sync and async, over one
executor or several.

    from atropos_agent.client import ExecutorClient

    with ExecutorClient("http://127.0.0.1:9001", token="...") as executor:
        result = executor.execute("trajectory-1", "terminal", {"command": "ls"})
        files = executor.list_artifacts("trajectory-1", recursive=True)
        executor.release("trajectory-1")

Workspaces (docs/executor.md, "Preparing once, running many"): ``upload_dir`` packs a local
folder and sends it raw; ``create_template``, ``fork`` and ``diff`` (unpacked into a local
folder) prepare once and fan out.

``AsyncExecutorClient`` has the same methods as coroutines; ``ExecutorClient`` runs one on an
event loop of its own and may be called from any number of threads at once. HTTP errors (401,
404, 503...) raise ``ExecutorError`` with the service's message; no answer at all (refused,
timed out, connection cut) raises its subclass ``ExecutorUnreachable``. A tool that failed is
not an error, it is a ``ToolResult`` with ``success`` false.

What is safe to retry is retried (``retries`` times, with back-off): a request that never
reached the service (connection refused), a 503 that says when to come back (``Retry-After``:
the service ran nothing), and any transport failure of a request that is safe to repeat:
reads, and ``execute``, which always sends a ``uniq_id`` (the service runs a call once per
``uniq_id`` and answers a repeat with the first result). Release, batches of calls without
their own ``uniq_id``, uploads and forks are never sent twice (a fork that failed took no
lease, and its 503 says so: that one is retried).

Several executors (``ExecutorClient([url_a, url_b])``, or ``ExecutorClient.from_nomad()`` to
find them through Nomad): each new trajectory goes to one chosen by rendezvous hashing of its
id, and stays there once it may hold a lease there (``routing.py``; docs/executor.md, "One
client, several executors").

The package, top-down: ``synchronous`` → ``asynchronous`` → ``routes`` (each route's request
and answer) | ``routing`` | ``discovery`` | ``archives`` → ``transport`` (aiohttp, or in
memory for tests).
"""

from __future__ import annotations

from atropos_agent.client.archives import (
    archive_of_dir,
    archive_of_file,
    extract_checked,
    unpack_diff,
    unpacking_order,
)
from atropos_agent.client.asynchronous import AsyncExecutorClient
from atropos_agent.client.routes import Call
from atropos_agent.client.synchronous import ExecutorClient
from atropos_agent.errors import ExecutorError, ExecutorUnreachable

__all__ = [
    "AsyncExecutorClient",
    "Call",
    "ExecutorClient",
    "ExecutorError",
    "ExecutorUnreachable",
    "archive_of_dir",
    "archive_of_file",
    "extract_checked",
    "unpack_diff",
    "unpacking_order",
]
