"""Uploads into a slot: a raw body streamed to a file, then extracted into the slot's workspace
by the slot's own agent (``agent/extract.py``).

The body goes to ``<data dir>/uploads/`` as it arrives (the server's own directory, which no
slot sees), never held whole in memory. Once the slot is the call's (its lock held, so no
command of it runs meanwhile), the file is renamed into the slot's /tmp and the agent is sent
``extract`` naming it; the agent opens it and unlinks it at once, so it never counts against
the slot's disk bound. The agent runs as the slot's uid inside its isolation: the files are
the slot's own, and on an overlay workspace they land in the slot's own layer.

Whatever happens, nothing stays behind: the server removes the body (in either place) and
the agent's staging directory (left only when the agent was lost midway) after the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from atropos_agent.models import UploadResponse
from atropos_agent.sandbox.agent.extract import STAGING_PREFIX, UPLOAD_PREFIX
from atropos_agent.sandbox.agent.framing import OP_EXTRACT
from atropos_agent.sandbox.protocol import UploadFormat
from atropos_agent.sandbox.settings import MIB, SandboxSettings
from atropos_agent.sandbox.slot import Call, Slot, wipe_dir

# An extraction's time: a base, and as much again per 4 MiB of body (the agent reads the
# archive twice: its headers first, then its files).
EXTRACT_BASE_S = 60.0
EXTRACT_BYTES_PER_S = 4 * MIB
# Body bytes gathered before one write to disk (in a worker thread, off the event loop).
WRITE_CHUNK = 1 * MIB


async def receive_to_file(chunks: AsyncIterator[bytes], path: Path, mode: int = 0o600) -> int:
    """Write a body arriving as ``chunks`` into the new file ``path`` (never an existing one,
    never through a symlink); its size. The file is removed when the body does not arrive
    whole (a cap exceeded, the client gone)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    size = 0
    pending: list[bytes] = []
    pending_bytes = 0
    try:
        async for chunk in chunks:
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= WRITE_CHUNK:
                await asyncio.to_thread(write_all, fd, b"".join(pending))
                size += pending_bytes
                pending, pending_bytes = [], 0
        if pending:
            await asyncio.to_thread(write_all, fd, b"".join(pending))
            size += pending_bytes
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
    return size


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Uploads:
    """Bodies on their way into slots, under ``directory``."""

    def __init__(self, directory: Path, settings: SandboxSettings) -> None:
        self.directory = directory
        self.settings = settings

    def prepare(self) -> None:
        """An empty directory only this server reads (what an earlier run left is gone)."""
        wipe_dir(self.directory)
        self.directory.mkdir(mode=0o700, parents=True)

    async def extract(
        self, slot: Slot, body: AsyncIterator[bytes], path: str, archive_format: UploadFormat
    ) -> tuple[UploadResponse, bool]:
        """Stream ``body`` to disk, then have ``slot``'s agent extract it at ``path``; the
        answer, and whether it is over a cap (413)."""
        name = uuid.uuid4().hex
        # Readable by the slot's uid once moved into its /tmp (this directory is the
        # server's alone until then).
        staged = self.directory / name
        handed = slot.paths.tmp / f"{UPLOAD_PREFIX}{name}"
        staging = f"{STAGING_PREFIX}{name}"
        try:
            size = await receive_to_file(body, staged, mode=0o644)
            request = {
                "op": OP_EXTRACT,
                "archive": handed.name,
                "staging": staging,
                "path": path,
                "format": archive_format,
                "max_bytes": self.settings.upload_max_bytes,
                "max_entries": self.settings.upload_max_entries,
            }
            timeout = EXTRACT_BASE_S + size / EXTRACT_BYTES_PER_S
            answers = await slot.call_many(
                [Call(request, timeout, before_send=lambda: hand_over(staged, handed))]
            )
        finally:
            for leftover in (staged, handed):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            # Only where the agent was lost midway: it removes its staging itself otherwise.
            # Never follows a symlink (rmtree refuses one at the top, and walks by descriptor).
            shutil.rmtree(slot.paths.workspace / staging, ignore_errors=True)
        result = answers[0]
        response = UploadResponse(
            success=bool(result.get("success")),
            error=str(result.get("error") or ""),
            bytes=size,
            entry_count=int(result.get("entry_count") or 0),
        )
        return response, result.get("limit") is not None


def hand_over(staged: Path, handed: Path) -> None:
    """Move the body into the slot's /tmp, once the slot is the upload's."""
    os.rename(staged, handed)
