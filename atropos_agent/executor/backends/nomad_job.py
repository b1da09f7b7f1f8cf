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

from atropos_agent.executor.settings import NomadSettings

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


def sandbox_env(settings: NomadSettings) -> dict[str, str]:
    """The pool's sandbox settings, listening on every interface of the allocation."""
    env = {**settings.sandbox_env, "ATROPOS_SANDBOX_HOST": "0.0.0.0"}
    if settings.driver == "docker":
        env["ATROPOS_SANDBOX_PORT"] = str(CONTAINER_PORT)
    return env


def task_config(settings: NomadSettings) -> dict[str, Any]:
    if settings.driver == "docker":
        return {
            "image": settings.image,
            "ports": [PORT_LABEL],
            "privileged": settings.privileged,
        }
    return {
        "command": settings.raw_exec_command,
        "args": ["-m", "atropos_agent.sandbox"],
    }


def build_job(settings: NomadSettings) -> dict[str, Any]:
    """The job to register (the value of ``{"Job": ...}``)."""
    port: dict[str, Any] = {"Label": PORT_LABEL}
    if settings.driver == "docker":
        port["To"] = CONTAINER_PORT
    group = {
        "Name": GROUP,
        "Count": settings.min_sandboxes,
        "Scaling": {
            "Min": settings.min_sandboxes,
            "Max": settings.max_sandboxes,
            "Enabled": True,
        },
        # No deployments: a scale is then never blocked by the previous one's deployment.
        "Update": {"MaxParallel": 0},
        "RestartPolicy": {
            "Attempts": settings.restart_attempts,
            "Interval": 300 * SECOND,
            "Delay": int(settings.restart_delay_s * SECOND),
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
                "Name": settings.service_name,
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
                "Driver": settings.driver,
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
                    "CPU": settings.cpu_mhz,
                    "MemoryMB": settings.memory_mb,
                },
                "KillTimeout": 15 * SECOND,
            }
        ],
    }
    job: dict[str, Any] = {
        "ID": settings.job_id,
        "Name": settings.job_id,
        "Type": "service",
        "Datacenters": list(settings.datacenters),
        "TaskGroups": [group],
    }
    if settings.namespace:
        job["Namespace"] = settings.namespace
    if settings.region:
        job["Region"] = settings.region
    job["Meta"] = {SPEC_HASH_META: spec_hash(job)}
    return job


def spec_hash(job: dict[str, Any]) -> str:
    """A digest of what the job runs, ignoring the live count (which scaling changes)."""
    stripped = json.loads(json.dumps(job))
    stripped.pop("Meta", None)
    for group in stripped.get("TaskGroups", []):
        group.pop("Count", None)
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()[:16]
