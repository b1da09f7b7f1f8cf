"""Sandbox server settings: flags override environment (``ATROPOS_SANDBOX_*``) and ``.env``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from atropos_agent.errors import SandboxStartError

MIB = 1024 * 1024
# An idle slot costs about 5 MiB (PSS): 32 warm ones, some 160 MiB per sandbox.
DEFAULT_WARM_SLOTS = 32


def default_data_dir() -> Path | None:
    """Under Nomad the allocation directory holds the workspaces; elsewhere a temp dir."""
    alloc_dir = os.environ.get("NOMAD_ALLOC_DIR")
    return Path(alloc_dir) / "data" if alloc_dir else None


class SandboxSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATROPOS_SANDBOX_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    host: str = "127.0.0.1"
    # Nomad hands each allocation its port in NOMAD_PORT_http; it wins over our own variable.
    port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("NOMAD_PORT_http", "ATROPOS_SANDBOX_PORT"),
    )
    slots: int = Field(default=10, ge=1, le=4096)
    # Free slots kept warm (agent started on a wiped workspace) ahead of demand; the others
    # start on their first call. 0: every slot on demand; slots or more: all warm.
    # docs/sandbox.md, "Warm slots".
    warm_slots: int = Field(default=DEFAULT_WARM_SLOTS, ge=0)
    data_dir: Path | None = Field(default_factory=default_data_dir)
    isolation: Literal["bwrap", "none"] = "bwrap"
    allow_network: bool = True
    token: SecretStr | None = None

    default_timeout_s: float = Field(default=30.0, gt=0)
    max_timeout_s: float = Field(default=600.0, gt=0)
    memory_mb: int = Field(default=2048, ge=64, description="address space per command")
    max_processes: int = Field(default=256, ge=8, description="processes per slot")
    max_output_bytes: int = Field(default=64 * 1024, ge=256)
    max_file_bytes: int = Field(default=5 * MIB, ge=1024)
    disk_mb: int = Field(default=1024, ge=1, description="workspace + /tmp per slot")
    max_request_bytes: int = Field(default=32 * MIB, ge=1024)
    max_pending_per_slot: int = Field(default=1024, ge=1)
    # An upload into a slot (PUT /slots/{id}/archive): its body, and the bytes and entries of
    # the archive extracted; beyond either, 413.
    upload_max_mb: int = Field(default=1024, ge=1)
    upload_max_entries: int = Field(default=200_000, ge=1)
    # Workspaces made of layers (templates, forks): "overlay" (copy-on-write), "copy" (a real
    # copy per slot), or "auto" (overlay where this host allows it). docs/sandbox.md.
    workspace_layers: Literal["auto", "overlay", "copy"] = "auto"
    # Disk the layer store may keep; unused layers beyond it are evicted, oldest use first.
    layer_cache_mb: int = Field(default=8192, ge=1)
    # How commands answer: "split" (the old service's form: stdout, then "[stderr]" and
    # stderr, stripped) or "merged" (both streams interleaved in one pipe, not stripped).
    terminal_output: Literal["split", "merged"] = "split"
    # A background job's timeout (background_run): the default, and the longest one honoured.
    job_timeout_s: float = Field(default=300.0, gt=0)

    # When the server runs as root, slot N runs as uid slot_uid_base + N: its own process
    # count, and no access to another slot's files even outside the mount namespace.
    slot_uid_base: int = Field(default=200_000, ge=1000)
    python: str | None = Field(default=None, description="python3 for the slot agent")
    shell: str | None = Field(default=None, description="shell for commands (bash, else sh)")

    @model_validator(mode="after")
    def check_limits(self) -> SandboxSettings:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        return self

    @property
    def warm_target(self) -> int:
        """How many free slots are kept warm: ``warm_slots``, at most every slot."""
        return min(self.warm_slots, self.slots)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * MIB

    @property
    def disk_bytes(self) -> int:
        return self.disk_mb * MIB

    @property
    def upload_max_bytes(self) -> int:
        return self.upload_max_mb * MIB

    @property
    def layer_cache_bytes(self) -> int:
        return self.layer_cache_mb * MIB

    def slot_python(self) -> str:
        """The interpreter the slot agent (and the ``python`` tool) runs with."""
        candidates = (
            [self.python] if self.python else ["/usr/bin/python3", "/usr/local/bin/python3"]
        )
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        raise SandboxStartError(
            f"no python3 for the slot agent (looked for {', '.join(map(str, candidates))}): "
            "install python3 (apt-get install python3) or set ATROPOS_SANDBOX_PYTHON"
        )

    def slot_shell(self) -> str:
        if self.shell:
            return self.shell
        return shutil.which("bash", path="/usr/bin:/bin") or "/bin/sh"
