"""Workspace layers reaching sandboxes, and a leased slot started on its layers.

A workspace made from a template or a fork is a list of layers (newest first) that its sandbox
holds in its layer store (docs/sandbox.md, "Workspace layers"). A layer reaches a sandbox the
first time a slot there needs it: the slot is asked to start on its layers, the sandbox
answers which it lacks (409), those are sent (``PUT /layers/{id}``) and the slot is asked
again. A template's layer comes from the registry's archive; any other (a fork's snapshot,
or a template deleted since) from the sandbox the workspace came from, streamed through.

However many slots of a sandbox ask at once, a layer is sent there once: the first to find
it missing sends it, the others wait for that. A slot whose request was answered "missing"
before that send ended just asks again; one whose request started after it (the sandbox
evicted the layer since) sends it anew.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

from atropos_agent.errors import MissingLayers, SandboxUnavailable
from atropos_agent.executor.leases import Lease, PoolSandbox
from atropos_agent.executor.templates import TemplateRegistry
from atropos_agent.executor.transport import CHUNK_BYTES
from atropos_agent.sandbox.protocol import WORKSPACES_VERSION

log = logging.getLogger("atropos.executor.shipping")

# Layers remembered as sent (per sandbox instance); an older entry forgotten only costs a
# request the sandbox answers "already there".
SHIPPED_MEMORY = 4096

Key = tuple[str, str, str]


class Shipping:
    def __init__(self, registry: TemplateRegistry) -> None:
        self.registry = registry
        # (sandbox id, instance id, layer id) -> when its send ended (monotonic), or pending.
        self.sent: OrderedDict[Key, asyncio.Future[float]] = OrderedDict()
        self.puts: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()

    async def start(
        self, lease: Lease, layers: Sequence[str], origin: PoolSandbox | None = None
    ) -> None:
        """Start the lease's slot on ``layers`` (its files wiped, as a reset): the layers it
        lacks are sent first, from the registry or from ``origin``."""
        sandbox = lease.sandbox
        require_workspaces(sandbox)
        for attempt in range(2):
            asked = time.monotonic()
            try:
                await sandbox.client.start_workspace(lease.slot_id, list(layers))
                return
            except MissingLayers as missing:
                if attempt:
                    raise
                await asyncio.gather(
                    *(self.ensure(sandbox, layer, origin, asked) for layer in missing.missing)
                )

    async def ensure(
        self, sandbox: PoolSandbox, layer_id: str, origin: PoolSandbox | None, missing_at: float
    ) -> None:
        """Send ``layer_id`` to ``sandbox``, found missing there by a request made at
        ``missing_at`` (monotonic): unless a send that ended after that, or is under way,
        has it covered."""
        key = (sandbox.sandbox_id, sandbox.instance_id, layer_id)
        under_way = self.sent.get(key)
        if under_way is not None and not under_way.done():
            await asyncio.shield(under_way)
            return
        if under_way is not None and under_way.result() > missing_at:
            return
        # Failed sends are not kept: an entry here is under way or ended well.
        sending: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.sent[key] = sending
        self.sent.move_to_end(key)
        self._forget_oldest()
        try:
            await self._send(sandbox, layer_id, origin)
        except BaseException as exc:
            self.sent.pop(key, None)
            sending.set_exception(exc)
            sending.exception()  # seen here: the waiters raise it themselves
            raise
        sending.set_result(time.monotonic())

    async def _send(self, sandbox: PoolSandbox, layer_id: str, origin: PoolSandbox | None) -> None:
        stored = self.registry.archive_of(layer_id)
        started = time.monotonic()
        sent = Counted()
        if stored is not None:
            answer = await sandbox.client.put_layer(layer_id, sent.chunks(file_chunks(stored)))
        elif origin is not None and origin is not sandbox:
            async with origin.client.layer_archive(layer_id) as chunks:
                answer = await sandbox.client.put_layer(layer_id, sent.chunks(chunks))
        else:
            raise SandboxUnavailable(
                f"layer {layer_id} is missing on sandbox {sandbox.sandbox_id}, and neither the "
                "template registry nor the workspace it came from holds it"
            )
        self.puts[sandbox.sandbox_id] += 1
        self.bytes_sent[sandbox.sandbox_id] += sent.bytes
        log.info(
            "event=layer_shipped sandbox=%s layer=%s bytes=%d created=%s from=%s seconds=%.3f",
            sandbox.sandbox_id,
            layer_id,
            sent.bytes,
            answer.created,
            "registry" if stored is not None else origin.sandbox_id if origin else "-",
            time.monotonic() - started,
        )

    def _forget_oldest(self) -> None:
        while len(self.sent) > SHIPPED_MEMORY:
            key, oldest = next(iter(self.sent.items()))
            if not oldest.done():
                return
            del self.sent[key]

    def forget_layer(self, layer_id: str) -> None:
        """The layer is gone everywhere (its template deleted): a later need sends it anew."""
        for key in [key for key in self.sent if key[2] == layer_id]:
            if self.sent[key].done():
                del self.sent[key]

    def describe(self) -> dict[str, object]:
        """For /status: layers sent to each sandbox, and their bytes."""
        return {
            "templates": len(self.registry.templates),
            "layers_sent": sum(self.puts.values()),
            "bytes_sent": sum(self.bytes_sent.values()),
            "layers_sent_by_sandbox": dict(self.puts),
        }


class Counted:
    """The bytes of a body as it is sent."""

    def __init__(self) -> None:
        self.bytes = 0

    async def chunks(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.bytes += len(chunk)
            yield chunk


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    """The file's bytes, read on a thread a chunk at a time."""
    with open(path, "rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk


def require_workspaces(sandbox: PoolSandbox) -> None:
    """Workspace layers, uploads, forks and diffs need a sandbox of protocol 5."""
    if sandbox.protocol_version < WORKSPACES_VERSION:
        raise SandboxUnavailable(
            f"sandbox {sandbox.sandbox_id} speaks protocol {sandbox.protocol_version}; uploads, "
            f"templates, forks and diffs need {WORKSPACES_VERSION}: run a sandbox image of the "
            "same release as the executor"
        )
