"""Executor settings: ``TOOL_EXECUTOR_*`` environment variables and a ``.env`` file.

Every name the old service read keeps its meaning and default; booleans accept
1/true/yes/y/on (and their negatives). An invalid value stops start-up with its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ExecutorSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOOL_EXECUTOR_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    # ---- the old service's names and defaults
    nomad_address: str = Field(
        default="http://localhost:4646",
        validation_alias=AliasChoices("TOOL_EXECUTOR_NOMAD_ADDRESS", "NOMAD_ADDR"),
    )
    job_id: str = "atropos-sandbox-tool-executor"
    image: str = "atropos-sandbox:local"
    slots: int = Field(default=10, ge=1, le=1024, description="slots per sandbox")
    min_containers: int = Field(default=1, ge=0)
    max_containers: int = Field(default=10, ge=1)
    privileged: bool = False
    acquire_timeout_s: float = Field(default=30.0, gt=0)
    batch_window_ms: float = Field(default=20.0, ge=0)
    max_batch_size: int = Field(default=200, ge=1)
    allow_network: bool = True
    tool_server_url: str | None = None
    tool_server_token: SecretStr | None = None
    token: SecretStr | None = None
    purge_job_on_shutdown: bool = True

    # ---- new
    backend: Literal["local", "nomad"] = "local"
    host: str = "127.0.0.1"
    port: int = Field(default=9001, ge=0, le=65535)
    lease_idle_expiry_s: float = Field(default=1800.0, gt=0)
    max_queue: int = Field(default=10_000, ge=1, description="calls in the service at once")
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    scale_down_idle_s: float = Field(
        default=120.0, gt=0, description="quiet period before shrinking"
    )
    health_interval_s: float = Field(default=2.0, gt=0)
    sandbox_isolation: Literal["bwrap", "none"] = "bwrap"
    sandbox_data_dir: Path | None = None
    sandbox_start_timeout_s: float = Field(default=60.0, gt=0)
    # Limits passed down to every sandbox (see docs/sandbox.md).
    sandbox_memory_mb: int = Field(default=2048, ge=64)
    sandbox_max_processes: int = Field(default=256, ge=8)
    sandbox_max_output_bytes: int = Field(default=64 * 1024, ge=256)
    sandbox_max_file_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    sandbox_disk_mb: int = Field(default=1024, ge=1)
    sandbox_slot_uid_base: int = Field(default=200_000, ge=1000)

    # Nomad connection. The ACL token keeps Nomad's own variable name; NOMAD_ADDR is honoured
    # when TOOL_EXECUTOR_NOMAD_ADDRESS is not set.
    nomad_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("NOMAD_TOKEN", "TOOL_EXECUTOR_NOMAD_TOKEN")
    )
    nomad_namespace: str | None = None
    nomad_region: str | None = None
    nomad_tls_verify: bool = True
    nomad_ca_cert: Path | None = Field(
        default=None, validation_alias=AliasChoices("TOOL_EXECUTOR_NOMAD_CA_CERT", "NOMAD_CACERT")
    )
    nomad_client_cert: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("TOOL_EXECUTOR_NOMAD_CLIENT_CERT", "NOMAD_CLIENT_CERT"),
    )
    nomad_client_key: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("TOOL_EXECUTOR_NOMAD_CLIENT_KEY", "NOMAD_CLIENT_KEY"),
    )
    nomad_timeout_s: float = Field(default=10.0, gt=0, description="per Nomad API request")
    # The sandbox job (executor/backends/nomad_job.py and nomad/sandbox.nomad.hcl).
    nomad_driver: Literal["docker", "raw_exec"] = "docker"
    nomad_datacenters: list[str] = Field(default_factory=lambda: ["*"])
    nomad_cpu_mhz: int = Field(default=1000, ge=100)
    nomad_memory_mb: int = Field(default=4096, ge=128)
    nomad_raw_exec_command: str = "python3"
    # Restarts of a crashed sandbox inside its allocation before Nomad reschedules it.
    nomad_restart_attempts: int = Field(default=3, ge=0)
    nomad_restart_delay_s: float = Field(default=5.0, ge=0)
    nomad_service_name: str = "atropos-sandbox"

    @model_validator(mode="after")
    def check_pool_bounds(self) -> ExecutorSettings:
        if self.min_containers > self.max_containers:
            raise ValueError(
                f"min_containers ({self.min_containers}) must not exceed "
                f"max_containers ({self.max_containers})"
            )
        return self

    @property
    def batch_window_s(self) -> float:
        return self.batch_window_ms / 1000
