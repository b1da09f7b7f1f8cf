"""The sandbox pool as a Nomad job, built from settings in one place.

A service job with one group, ``sandbox``: N allocations, each running the sandbox server with
S slots. ``nomad/sandbox.nomad.hcl`` is the same job as a file (a test keeps the two in
agreement). Field names are Nomad's JSON API (https://developer.hashicorp.com/nomad/api-docs/json-jobs);
durations are nanoseconds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from atropos_agent.executor.settings import ExecutorSettings

GROUP = "sandbox"
TASK = "sandbox-server"
PORT_LABEL = "http"
# Inside a docker container the server listens here; raw_exec tasks use NOMAD_PORT_http.
CONTAINER_PORT = 8080
SECOND = 1_000_000_000
SPEC_HASH_META = "atropos_spec_hash"


def token_variable_path(job_id: str) -> str:
    """Nomad Variable holding the sandboxes' shared token.

    Tasks of job ``job_id`` may read ``nomad/jobs/<job_id>`` without any policy (workload
    identity), and the token never appears in the job's visible spec.
    """
    return f"nomad/jobs/{job_id}"


def token_template(job_id: str) -> str:
    path = token_variable_path(job_id)
    return (
        f'ATROPOS_SANDBOX_TOKEN={{{{ with nomadVar "{path}" }}}}'
        "{{ .sandbox_token }}{{ end }}\n"
    )


def sandbox_env(settings: ExecutorSettings) -> dict[str, str]:
    """The sandbox server's settings, passed down from the executor's."""
    env = {
        "ATROPOS_SANDBOX_HOST": "0.0.0.0",
        "ATROPOS_SANDBOX_SLOTS": str(settings.slots),
        "ATROPOS_SANDBOX_ALLOW_NETWORK": str(settings.allow_network).lower(),
        "ATROPOS_SANDBOX_MEMORY_MB": str(settings.sandbox_memory_mb),
        "ATROPOS_SANDBOX_MAX_PROCESSES": str(settings.sandbox_max_processes),
        "ATROPOS_SANDBOX_MAX_OUTPUT_BYTES": str(settings.sandbox_max_output_bytes),
        "ATROPOS_SANDBOX_MAX_FILE_BYTES": str(settings.sandbox_max_file_bytes),
        "ATROPOS_SANDBOX_DISK_MB": str(settings.sandbox_disk_mb),
        "ATROPOS_SANDBOX_MAX_REQUEST_BYTES": str(settings.max_request_bytes),
        "ATROPOS_SANDBOX_ISOLATION": settings.sandbox_isolation,
        "ATROPOS_SANDBOX_SLOT_UID_BASE": str(settings.sandbox_slot_uid_base),
    }
    if settings.nomad_driver == "docker":
        env["ATROPOS_SANDBOX_PORT"] = str(CONTAINER_PORT)
    return env


def task_config(settings: ExecutorSettings) -> dict[str, Any]:
    if settings.nomad_driver == "docker":
        return {
            "image": settings.image,
            "ports": [PORT_LABEL],
            "privileged": settings.privileged,
        }
    return {
        "command": settings.nomad_raw_exec_command,
        "args": ["-m", "atropos_agent.sandbox"],
    }


def build_job(settings: ExecutorSettings) -> dict[str, Any]:
    """The job to register (the value of ``{"Job": ...}``)."""
    port: dict[str, Any] = {"Label": PORT_LABEL}
    if settings.nomad_driver == "docker":
        port["To"] = CONTAINER_PORT
    group = {
        "Name": GROUP,
        "Count": settings.min_containers,
        "Scaling": {
            "Min": settings.min_containers,
            "Max": settings.max_containers,
            "Enabled": True,
        },
        # No deployments: a scale is then never blocked by the previous one's deployment.
        "Update": {"MaxParallel": 0},
        "RestartPolicy": {
            "Attempts": settings.nomad_restart_attempts,
            "Interval": 300 * SECOND,
            "Delay": int(settings.nomad_restart_delay_s * SECOND),
            "Mode": "fail",
        },
        "ReschedulePolicy": {
            "Attempts": 0,
            "Interval": 0,
            "Delay": 5 * SECOND,
            "DelayFunction": "exponential",
            "MaxDelay": 120 * SECOND,
            "Unlimited": True,
        },
        "Networks": [{"Mode": "host", "DynamicPorts": [port]}],
        "Services": [
            {
                "Name": settings.nomad_service_name,
                "PortLabel": PORT_LABEL,
                "Provider": "nomad",
                "Checks": [
                    {
                        "Name": "sandbox-health",
                        "Type": "http",
                        "Path": "/health",
                        "Interval": 5 * SECOND,
                        "Timeout": 2 * SECOND,
                    }
                ],
            }
        ],
        "Tasks": [
            {
                "Name": TASK,
                "Driver": settings.nomad_driver,
                "Config": task_config(settings),
                "Env": sandbox_env(settings),
                "Templates": [
                    {
                        "EmbeddedTmpl": token_template(settings.job_id),
                        "DestPath": "secrets/sandbox.env",
                        "Envvars": True,
                        "ChangeMode": "restart",
                    }
                ],
                "Resources": {
                    "CPU": settings.nomad_cpu_mhz,
                    "MemoryMB": settings.nomad_memory_mb,
                },
                "KillTimeout": 15 * SECOND,
            }
        ],
    }
    job: dict[str, Any] = {
        "ID": settings.job_id,
        "Name": settings.job_id,
        "Type": "service",
        "Datacenters": settings.nomad_datacenters,
        "TaskGroups": [group],
    }
    if settings.nomad_namespace:
        job["Namespace"] = settings.nomad_namespace
    if settings.nomad_region:
        job["Region"] = settings.nomad_region
    job["Meta"] = {SPEC_HASH_META: spec_hash(job)}
    return job


def spec_hash(job: dict[str, Any]) -> str:
    """A digest of what the job runs, ignoring the live count (which scaling changes)."""
    stripped = json.loads(json.dumps(job))
    stripped.pop("Meta", None)
    for group in stripped.get("TaskGroups", []):
        group.pop("Count", None)
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]
