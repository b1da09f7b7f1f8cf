"""Executor settings: ``TOOL_EXECUTOR_*`` environment variables and a ``.env`` file.

Every name the old service read keeps its meaning and default; booleans accept
1/true/yes/y/on (and their negatives). An invalid value stops start-up with its name.

``ExecutorSettings`` is read once, at start; each component gets only the part it uses
(``pool()``, ``calls()``, ``local()``, ``nomad()``), and ``sandbox_environment()`` is the one
translation of executor settings into a sandbox server's (``ATROPOS_SANDBOX_*``), used by
both backends.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from atropos_agent.serving import ConnectionBounds


def default_state_dir() -> Path:
    """One per uid in the temporary directory: a restarted executor finds its predecessor's."""
    return Path(tempfile.gettempdir()) / f"atropos-executor-{os.getuid()}"


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
    # Every lease ends this long after it was taken, used or not (unset: only idle expiry).
    lease_max_age_s: float | None = Field(default=None, gt=0)
    # Results kept so that a call retried with its uniq_id runs once (executor/replays.py).
    replay_max_mb: int = Field(default=256, ge=1)
    replay_per_trajectory: int = Field(default=1024, ge=1)
    max_queue: int = Field(default=10_000, ge=1, description="calls in the service at once")
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    scale_down_idle_s: float = Field(
        default=120.0, gt=0, description="quiet period before shrinking"
    )
    health_interval_s: float = Field(default=2.0, gt=0)
    sandbox_isolation: Literal["bwrap", "none"] = "bwrap"
    sandbox_data_dir: Path | None = None
    # What outlives one executor process: its lease journal, the local pool's data dirs.
    state_dir: Path = Field(default_factory=default_state_dir)
    sandbox_start_timeout_s: float = Field(default=60.0, gt=0)
    # Limits passed down to every sandbox (see docs/sandbox.md).
    sandbox_memory_mb: int = Field(default=2048, ge=64)
    sandbox_max_processes: int = Field(default=256, ge=8)
    sandbox_max_output_bytes: int = Field(default=64 * 1024, ge=256)
    sandbox_max_file_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    sandbox_disk_mb: int = Field(default=1024, ge=1)
    sandbox_slot_uid_base: int = Field(default=200_000, ge=1000)
    # How `terminal` answers: "split" (the old service's form: stdout, then "[stderr]" and
    # stderr) or "merged" (both streams interleaved as the command wrote them).
    terminal_output: Literal["split", "merged"] = "split"
    # A background job's timeout in every sandbox: the default, and the longest one honoured.
    sandbox_job_timeout_s: float = Field(default=300.0, gt=0)
    # Connections and shutdown (atropos_agent/serving.py, docs/operations.md). The shutdown
    # bound stays under Nomad's default kill_timeout (5 s).
    keep_alive_s: float = Field(default=75.0, gt=0, description="idle keep-alive")
    request_header_timeout_s: float = Field(default=10.0, gt=0)
    request_body_timeout_s: float = Field(default=60.0, gt=0)
    shutdown_grace_s: float = Field(
        default=1.5, ge=0, description="calls in flight may finish within this after SIGTERM"
    )
    shutdown_timeout_s: float = Field(
        default=4.5, gt=0, description="SIGTERM to exit, whatever is still running"
    )

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
    # Several executors of one Nomad job (count > 1) each own a pool: in an allocation (Nomad
    # sets NOMAD_ALLOC_INDEX) the pool job is `<job_id>-<index>`, an index a replacement
    # allocation keeps, so it adopts its predecessor's pool. False keeps `job_id` as it is.
    job_id_per_alloc: bool = True
    nomad_alloc_index: int | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("NOMAD_ALLOC_INDEX")
    )

    # Prometheus metrics (docs/operations.md, "Metrics"): GET /metrics on the service's port
    # asks for the token; metrics_port also serves them without auth, on metrics_host.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # Who sets the sandbox count: the executor, or an outside autoscaler following the gauge
    # atropos_executor_sandboxes_wanted (nomad/autoscaler-policy.hcl); "external" never scales.
    scaling: Literal["executor", "external"] = "executor"
    # Free slots the pool keeps ready beyond its leases and the calls waiting for one.
    headroom_slots: int = Field(default=0, ge=0)
    # Free slots each sandbox keeps warm (agent started) ahead of demand; the others start on
    # their first call. 0: all on demand; `slots` or more: all warm (docs/sandbox.md).
    warm_slots: int = Field(default=32, ge=0)

    # Workspaces (docs/executor.md, "Preparing once, running many"): the largest archive an
    # upload or a template may be, and its most entries; every sandbox gets the same caps.
    upload_max_mb: int = Field(default=1024, ge=1)
    upload_max_entries: int = Field(default=200_000, ge=1)
    # Each sandbox's store of template and fork layers: unused ones beyond it are evicted.
    sandbox_layer_cache_mb: int = Field(default=8192, ge=1)
    # Copy-on-write workspaces: "auto" (overlayfs where the kernel allows, else a real copy),
    # "overlay" (a sandbox refuses to start without it), "copy".
    sandbox_workspace_layers: Literal["auto", "overlay", "copy"] = "auto"

    @model_validator(mode="after")
    def check_shutdown_bounds(self) -> ExecutorSettings:
        if self.shutdown_grace_s >= self.shutdown_timeout_s:
            raise ValueError(
                f"TOOL_EXECUTOR_SHUTDOWN_GRACE_S ({self.shutdown_grace_s:g}) must be less than "
                f"TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S ({self.shutdown_timeout_s:g}): stopping the "
                "sandboxes needs time after the grace"
            )
        return self

    @model_validator(mode="after")
    def check_pool_bounds(self) -> ExecutorSettings:
        if self.min_containers > self.max_containers:
            raise ValueError(
                f"min_containers ({self.min_containers}) must not exceed "
                f"max_containers ({self.max_containers})"
            )
        return self

    @property
    def pool_job_id(self) -> str:
        """The pool job this executor registers, scales and names its journal after."""
        if self.job_id_per_alloc and self.nomad_alloc_index is not None:
            return f"{self.job_id}-{self.nomad_alloc_index}"
        return self.job_id

    @property
    def pool_slot_uid_base(self) -> int:
        """Where this executor's pool's slot uids start. Executors of one job keep their pools'
        ranges apart (each sandbox adds its own allocation index): sandboxes in containers on
        one node cannot see each other's claims."""
        if self.job_id_per_alloc and self.nomad_alloc_index is not None:
            pool_uids = self.max_containers * self.slots
            return self.sandbox_slot_uid_base + self.nomad_alloc_index * pool_uids
        return self.sandbox_slot_uid_base

    def pool(self) -> PoolSettings:
        return PoolSettings(
            slots_per_sandbox=self.slots,
            min_sandboxes=self.min_containers,
            max_sandboxes=self.max_containers,
            health_interval_s=self.health_interval_s,
            scale_down_idle_s=self.scale_down_idle_s,
            start_timeout_s=self.sandbox_start_timeout_s,
            batch_window_s=self.batch_window_ms / 1000,
            max_batch_size=self.max_batch_size,
            headroom_slots=self.headroom_slots,
            scaling=self.scaling,
            warm_slots=self.warm_slots,
        )

    def connections(self) -> ConnectionBounds:
        return ConnectionBounds(
            keep_alive_s=self.keep_alive_s,
            header_timeout_s=self.request_header_timeout_s,
            body_timeout_s=self.request_body_timeout_s,
        )

    def calls(self) -> CallSettings:
        return CallSettings(
            max_queue=self.max_queue,
            acquire_timeout_s=self.acquire_timeout_s,
            lease_idle_expiry_s=self.lease_idle_expiry_s,
            lease_max_age_s=self.lease_max_age_s,
            replay_max_bytes=self.replay_max_mb * 1024 * 1024,
            replay_per_trajectory=self.replay_per_trajectory,
        )

    def local(self) -> LocalSettings:
        return LocalSettings(
            slots_per_sandbox=self.slots,
            min_sandboxes=self.min_containers,
            max_sandboxes=self.max_containers,
            start_timeout_s=self.sandbox_start_timeout_s,
            data_dir=self.sandbox_data_dir,
            state_dir=self.state_dir,
            slot_uid_base=self.sandbox_slot_uid_base,
            sandbox_env=self.sandbox_environment(),
        )

    def journal(self) -> JournalSettings:
        # An executor started again at the same address (or on the same Nomad job) is the same
        # service to its trainers.
        if self.backend == "nomad":
            identity: str | None = f"nomad-{self.pool_job_id}"
        else:
            identity = f"local-{self.port}" if self.port else None
        return JournalSettings(state_dir=self.state_dir, identity=identity)

    def workspaces(self) -> WorkspaceSettings:
        return WorkspaceSettings(
            journal=self.journal(),
            upload_max_bytes=self.upload_max_mb * 1024 * 1024,
            upload_max_entries=self.upload_max_entries,
        )

    def nomad(self) -> NomadSettings:
        return NomadSettings(
            address=self.nomad_address.rstrip("/"),
            acl_token=self.nomad_token.get_secret_value() if self.nomad_token else None,
            namespace=self.nomad_namespace,
            region=self.nomad_region,
            tls_verify=self.nomad_tls_verify,
            ca_cert=self.nomad_ca_cert,
            client_cert=self.nomad_client_cert,
            client_key=self.nomad_client_key,
            timeout_s=self.nomad_timeout_s,
            job_id=self.pool_job_id,
            image=self.image,
            driver=self.nomad_driver,
            privileged=self.privileged,
            raw_exec_command=self.nomad_raw_exec_command,
            datacenters=tuple(self.nomad_datacenters),
            cpu_mhz=self.nomad_cpu_mhz,
            memory_mb=self.nomad_memory_mb,
            restart_attempts=self.nomad_restart_attempts,
            restart_delay_s=self.nomad_restart_delay_s,
            service_name=self.nomad_service_name,
            purge_on_shutdown=self.purge_job_on_shutdown,
            slots_per_sandbox=self.slots,
            min_sandboxes=self.min_containers,
            max_sandboxes=self.max_containers,
            start_timeout_s=self.sandbox_start_timeout_s,
            isolation=self.sandbox_isolation,
            sandbox_env=self.sandbox_environment(),
        )

    def sandbox_environment(self) -> dict[str, str]:
        """What every sandbox server of the pool is told (``ATROPOS_SANDBOX_*``); backends add
        where it listens, its data dir and its token."""
        return {
            "ATROPOS_SANDBOX_SLOTS": str(self.slots),
            "ATROPOS_SANDBOX_ALLOW_NETWORK": str(self.allow_network).lower(),
            "ATROPOS_SANDBOX_ISOLATION": self.sandbox_isolation,
            "ATROPOS_SANDBOX_MEMORY_MB": str(self.sandbox_memory_mb),
            "ATROPOS_SANDBOX_MAX_PROCESSES": str(self.sandbox_max_processes),
            "ATROPOS_SANDBOX_MAX_OUTPUT_BYTES": str(self.sandbox_max_output_bytes),
            "ATROPOS_SANDBOX_MAX_FILE_BYTES": str(self.sandbox_max_file_bytes),
            "ATROPOS_SANDBOX_DISK_MB": str(self.sandbox_disk_mb),
            "ATROPOS_SANDBOX_MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "ATROPOS_SANDBOX_SLOT_UID_BASE": str(self.pool_slot_uid_base),
            "ATROPOS_SANDBOX_TERMINAL_OUTPUT": self.terminal_output,
            "ATROPOS_SANDBOX_JOB_TIMEOUT_S": f"{self.sandbox_job_timeout_s:g}",
            "ATROPOS_SANDBOX_UPLOAD_MAX_MB": str(self.upload_max_mb),
            "ATROPOS_SANDBOX_UPLOAD_MAX_ENTRIES": str(self.upload_max_entries),
            "ATROPOS_SANDBOX_LAYER_CACHE_MB": str(self.sandbox_layer_cache_mb),
            "ATROPOS_SANDBOX_WORKSPACE_LAYERS": self.sandbox_workspace_layers,
            "ATROPOS_SANDBOX_WARM_SLOTS": str(self.warm_slots),
        }


@dataclass(frozen=True)
class PoolSettings:
    """How many sandboxes, how often they are checked, how calls to them are batched."""

    slots_per_sandbox: int
    min_sandboxes: int
    max_sandboxes: int
    health_interval_s: float
    # Quiet period before an idle sandbox is stopped.
    scale_down_idle_s: float
    # How long a scale-up may take to show its new sandboxes.
    start_timeout_s: float
    batch_window_s: float
    max_batch_size: int
    # Free slots kept ready beyond leases and waiting calls (scaling.py).
    headroom_slots: int = 0
    # "external": the count is set from outside (an autoscaler); the pool never asks for one.
    scaling: Literal["executor", "external"] = "executor"
    # Free slots each sandbox keeps warm; the headroom counts only those (scaling.py). None:
    # every slot (sandboxes that start all their slots).
    warm_slots: int | None = None


@dataclass(frozen=True)
class CallSettings:
    """Bounds on the calls the executor holds."""

    max_queue: int
    acquire_timeout_s: float
    lease_idle_expiry_s: float
    lease_max_age_s: float | None = None
    replay_max_bytes: int = 256 * 1024 * 1024
    replay_per_trajectory: int = 1024


@dataclass(frozen=True)
class LocalSettings:
    """Sandboxes as child processes on this machine."""

    slots_per_sandbox: int
    min_sandboxes: int
    max_sandboxes: int
    start_timeout_s: float
    # None: a directory of its own under state_dir, removed on shutdown.
    data_dir: Path | None
    state_dir: Path
    # Sandbox N claims slot uids from slot_uid_base + N * slots_per_sandbox.
    slot_uid_base: int
    sandbox_env: dict[str, str]


@dataclass(frozen=True)
class JournalSettings:
    """Where the lease journal lives (``lease_journal.py``)."""

    state_dir: Path
    # None: on a port picked at random the executor is never the same service again, so its
    # journal stays in memory.
    identity: str | None


@dataclass(frozen=True)
class WorkspaceSettings:
    """Templates (kept beside the lease journal, by the same identity) and the caps on
    archives a trainer sends."""

    journal: JournalSettings
    upload_max_bytes: int
    upload_max_entries: int


@dataclass(frozen=True)
class NomadSettings:
    """The pool as one Nomad job: how to reach Nomad, and what the job runs."""

    address: str
    acl_token: str | None
    namespace: str | None
    region: str | None
    tls_verify: bool
    ca_cert: Path | None
    client_cert: Path | None
    client_key: Path | None
    timeout_s: float
    job_id: str
    image: str
    driver: Literal["docker", "raw_exec"]
    privileged: bool
    raw_exec_command: str
    datacenters: tuple[str, ...]
    cpu_mhz: int
    memory_mb: int
    restart_attempts: int
    restart_delay_s: float
    service_name: str
    purge_on_shutdown: bool
    slots_per_sandbox: int
    min_sandboxes: int
    max_sandboxes: int
    start_timeout_s: float
    isolation: Literal["bwrap", "none"]
    sandbox_env: dict[str, str]
