"""Workspace templates by name: their archives on disk, surviving a restart of the executor.

A template is a tar.gz a trainer sent (``POST /templates``, ``PUT /templates/{name}``) or the
files of a live workspace (``POST /templates {name, trajectory_id}``). Its archive is stored
once per content, as ``<sha256>.tar.gz``, and names point at contents in ``index.json``
(written whole, then renamed over the old one: a crash leaves the old index or the new, never
half of one). Sandboxes know a template as the layer ``sha256-<hex>`` (``layer_id``): its
content, not its name, so renaming or re-creating a name never changes a running workspace.

Where: ``<state dir>/templates-<identity>/``, the identity being the lease journal's (the
executor at the same address, or on the same Nomad job), which the journal's lock already
keeps to one live executor. An executor without an identity (a port picked at random) keeps
its templates in ``templates-run-*``, removed when it stops, or by the next executor to start
once nobody holds its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterable
from dataclasses import asdict, dataclass
from pathlib import Path

from atropos_agent.errors import BackendError, TooLarge, UnknownTemplate
from atropos_agent.executor.archives import ArchiveCaps, check_archive
from atropos_agent.executor.settings import WorkspaceSettings
from atropos_agent.executor.state_dir import FileLock, open_state_dir
from atropos_agent.models import TemplateInfo

log = logging.getLogger("atropos.executor.templates")

INDEX = "index.json"
LOCK_NAME = "templates.lock"
RUN_PREFIX = "templates-run-"
LAYER_PREFIX = "sha256-"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def layer_id_of(sha256: str) -> str:
    """The id sandboxes store a template's content under."""
    return LAYER_PREFIX + sha256


@dataclass(frozen=True)
class Template:
    name: str
    sha256: str
    bytes: int
    entry_count: int
    created_at: float

    @property
    def layer_id(self) -> str:
        return layer_id_of(self.sha256)

    def info(self) -> TemplateInfo:
        return TemplateInfo(
            name=self.name,
            bytes=self.bytes,
            entry_count=self.entry_count,
            sha256=self.sha256,
            created_at=round(self.created_at, 3),
        )


class TemplateRegistry:
    def __init__(self, settings: WorkspaceSettings) -> None:
        self.settings = settings
        self.caps = ArchiveCaps(settings.upload_max_bytes, settings.upload_max_entries)
        self.directory: Path | None = None
        self.templates: dict[str, Template] = {}
        # Held while this executor keeps a run directory (no identity).
        self.run_lock: FileLock | None = None

    # ---- life cycle

    def open(self) -> None:
        """Find the templates a predecessor of the same identity left (or make a run
        directory). Raises BackendError when the directory or its index cannot be read."""
        journal = self.settings.journal
        state_dir = open_state_dir(journal.state_dir)
        remove_dead_run_dirs(state_dir)
        if journal.identity is None:
            # Locked before it takes the name another executor's clean-up looks for.
            starting = Path(tempfile.mkdtemp(prefix="." + RUN_PREFIX, dir=state_dir))
            self.run_lock = FileLock.take(starting / LOCK_NAME)
            self.directory = starting.rename(state_dir / starting.name[1:])
        else:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", journal.identity)
            self.directory = state_dir / f"templates-{safe}"
            self.directory.mkdir(mode=0o700, exist_ok=True)
        self.templates = self._read_index()
        self._remove_unreferenced()
        if self.templates:
            log.info("event=templates_found count=%d dir=%s", len(self.templates), self.directory)

    def close(self) -> None:
        if self.run_lock is not None and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.run_lock.close()
            self.run_lock = None

    def _read_index(self) -> dict[str, Template]:
        assert self.directory is not None
        path = self.directory / INDEX
        try:
            entries = json.loads(path.read_text())["templates"]
            return {name: Template(name=name, **fields) for name, fields in entries.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(
                f"cannot read the template index {path}: {exc}; if it is damaged, remove the "
                "directory (its templates are then gone)"
            ) from None

    def _write_index(self) -> None:
        assert self.directory is not None
        entries = {
            name: {key: value for key, value in asdict(t).items() if key != "name"}
            for name, t in sorted(self.templates.items())
        }
        staged = self.directory / f".{INDEX}.{uuid.uuid4().hex}"
        with open(staged, "w") as handle:
            json.dump({"templates": entries}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        staged.replace(self.directory / INDEX)

    def _remove_unreferenced(self) -> None:
        """Archives no name points at (a crash between storing one and the index), and
        uploads that never finished."""
        assert self.directory is not None
        kept = {f"{t.sha256}.tar.gz" for t in self.templates.values()}
        for entry in self.directory.iterdir():
            if entry.name in (INDEX, LOCK_NAME) or entry.name in kept:
                continue
            with contextlib.suppress(OSError):
                entry.unlink()

    # ---- lookups

    def get(self, name: str) -> Template:
        template = self.templates.get(name)
        if template is None:
            known = ", ".join(sorted(self.templates)[:20]) or "none"
            raise UnknownTemplate(
                f"unknown template {name!r} (templates: {known}); create it with POST /templates"
            )
        return template

    def list(self) -> list[Template]:
        return sorted(self.templates.values(), key=lambda t: t.created_at)

    def archive_of(self, layer_id: str) -> Path | None:
        """The stored archive of a template layer, or None (not a template's, or deleted)."""
        sha256 = layer_id.removeprefix(LAYER_PREFIX)
        if self.directory is None or not SHA256_HEX.fullmatch(sha256):
            return None
        path = self.directory / f"{sha256}.tar.gz"
        return path if path.exists() else None

    # ---- changes

    async def add(self, name: str, chunks: AsyncIterable[bytes]) -> Template:
        """Store the archive ``chunks`` make as template ``name`` (replacing the name's
        content, if any). Checked first (``archives.check_archive``): ``ArchiveRefused``,
        ``TooLarge``; nothing is kept of a refused archive."""
        assert self.directory is not None
        staged = self.directory / f".incoming-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(staged, "wb") as handle:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.caps.max_bytes:
                        raise TooLarge(
                            f"the archive is over the {self.caps.max_bytes}-byte cap "
                            "(TOOL_EXECUTOR_UPLOAD_MAX_MB)"
                        )
                    digest.update(chunk)
                    handle.write(chunk)
            entry_count = await asyncio.to_thread(check_archive, staged, self.caps)
            sha256 = digest.hexdigest()
            staged.replace(self.directory / f"{sha256}.tar.gz")
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        replaced = self.templates.get(name)
        template = Template(name, sha256, size, entry_count, time.time())
        self.templates[name] = template
        self._write_index()
        if replaced is not None and replaced.sha256 != sha256:
            self._drop_content(replaced.sha256)
        log.info(
            "event=template_stored name=%s sha256=%s bytes=%d entries=%d",
            name,
            sha256,
            size,
            entry_count,
        )
        return template

    def remove(self, name: str) -> tuple[Template, bool]:
        """Forget ``name``; its archive goes too unless another name has the same content.
        Returns the template and whether its content is gone."""
        template = self.get(name)
        del self.templates[name]
        self._write_index()
        gone = self._drop_content(template.sha256)
        log.info("event=template_deleted name=%s content_removed=%s", name, gone)
        return template, gone

    def _drop_content(self, sha256: str) -> bool:
        assert self.directory is not None
        if any(t.sha256 == sha256 for t in self.templates.values()):
            return False
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{sha256}.tar.gz").unlink()
        return True


def remove_dead_run_dirs(state_dir: Path) -> None:
    """``templates-run-*`` directories of executors that are gone (their lock is free)."""
    for directory in state_dir.glob(RUN_PREFIX + "*"):
        try:
            lock = FileLock.take(directory / LOCK_NAME)
        except OSError:
            continue
        if lock is not None:
            shutil.rmtree(directory, ignore_errors=True)
            lock.close()
