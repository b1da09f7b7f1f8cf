"""Executors as a Nomad job on the API double, as ``nomad/tool-executor.nomad.hcl`` runs them.

One group of ``count`` allocations, each a raw_exec ``atropos-tool-executor serve`` with the
Nomad backend on the same double: it gets ``NOMAD_ALLOC_INDEX`` from its allocation, so it
registers a sandbox pool job of its own (``<TOOL_EXECUTOR_JOB_ID>-<index>``), and its
allocation registers the Nomad-native service ``atropos-tool-executor`` with an HTTP check on
``/health``, by which trainers find it.

    job = run_executors(double, 3, env={"TOOL_EXECUTOR_SLOTS": "4"})
    job.urls                    # {alloc index: "http://127.0.0.1:PORT"}, every one healthy
    job.crash(1)                # SIGKILL executor 1: not restarted, not rescheduled

Every process is the double's: closing the double ends them all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from harness.nomad_double import NomadDouble
from harness.servers import TOKEN, nomad_settings

JOB = "atropos-tool-executor"
SERVICE = "atropos-tool-executor"
SECOND = 1_000_000_000


def executor_job(double: NomadDouble, count: int, env: Mapping[str, str]) -> dict[str, Any]:
    """The job (the value of ``{"Job": ...}``): ``env`` holds the executors' settings."""
    task_env = {
        **nomad_settings(double),
        "TOOL_EXECUTOR_HOST": "127.0.0.1",
        "TOOL_EXECUTOR_PORT": "${NOMAD_PORT_http}",
        "TOOL_EXECUTOR_STATE_DIR": "${NOMAD_ALLOC_DIR}/state",
        "TOOL_EXECUTOR_TOKEN": TOKEN,
        **env,
    }
    return {
        "ID": JOB,
        "Name": JOB,
        "Type": "service",
        "Datacenters": ["*"],
        "TaskGroups": [
            {
                "Name": "executor",
                "Count": count,
                "Update": {"MaxParallel": 0},
                # A crashed executor stays down: what its trainers see is the point.
                "RestartPolicy": {
                    "Attempts": 0,
                    "Interval": 300 * SECOND,
                    "Delay": SECOND,
                    "Mode": "fail",
                },
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Networks": [{"Mode": "host", "DynamicPorts": [{"Label": "http"}]}],
                "Services": [
                    {
                        "Name": SERVICE,
                        "PortLabel": "http",
                        "Provider": "nomad",
                        "Checks": [
                            {
                                "Name": "executor-health",
                                "Type": "http",
                                "Path": "/health",
                                "Interval": SECOND,
                                "Timeout": 2 * SECOND,
                            }
                        ],
                    }
                ],
                "Tasks": [
                    {
                        "Name": "executor",
                        "Driver": "raw_exec",
                        "Config": {
                            "command": sys.executable,
                            "args": ["-m", "atropos_agent.cli", "serve"],
                        },
                        "Env": task_env,
                        "Resources": {"CPU": 500, "MemoryMB": 512},
                        "KillSignal": "SIGTERM",
                        "KillTimeout": 10 * SECOND,
                    }
                ],
            }
        ],
    }


@dataclass
class ExecutorJob:
    """The executors of one job on ``double``: their allocations and URLs by alloc index."""

    double: NomadDouble
    allocations: dict[int, str] = field(default_factory=dict)
    urls: dict[int, str] = field(default_factory=dict)

    def nomad(self) -> httpx.Client:
        headers = {"X-Nomad-Token": self.double.acl_token} if self.double.acl_token else {}
        return httpx.Client(base_url=self.double.address, headers=headers, timeout=10)

    def registrations(self) -> list[dict[str, Any]]:
        """The service's registrations, as a trainer's client reads them."""
        with self.nomad() as nomad:
            found: list[dict[str, Any]] = nomad.get(f"/v1/service/{SERVICE}").json()
        return found

    def checks_passing(self, alloc_id: str) -> bool:
        with self.nomad() as nomad:
            checks = nomad.get(f"/v1/allocation/{alloc_id}/checks").json()
        return bool(checks) and all(c["Status"] == "success" for c in checks.values())

    def log(self, index: int) -> str:
        """What executor ``index`` wrote (stdout and stderr)."""
        logs = self.double.alloc_dir(self.allocations[index]) / "alloc" / "logs"
        return "".join(
            path.read_text(errors="replace") for path in sorted(logs.glob("executor.std*"))
        )

    def crash(self, index: int) -> None:
        """SIGKILL executor ``index``; returns once Nomad has marked its allocation failed."""
        alloc_id = self.allocations[index]
        self.double.kill_task(alloc_id)
        self.double.wait_until(
            lambda: self.double.allocation(alloc_id)["ClientStatus"] == "failed", timeout_s=15
        )


def run_executors(
    double: NomadDouble, count: int, env: Mapping[str, str], timeout_s: float = 60
) -> ExecutorJob:
    """Register ``count`` executors; returns once every one is registered and its check passes
    (its ``/health`` answers 200: its pool serves). Raises with their logs otherwise."""
    job = ExecutorJob(double)
    with job.nomad() as nomad:
        answer = nomad.post("/v1/jobs", json={"Job": executor_job(double, count, env)})
        answer.raise_for_status()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = {a["ID"]: a for a in double.running(JOB)}
        registrations = [r for r in job.registrations() if r["AllocID"] in running]
        if len(registrations) == count and all(
            job.checks_passing(r["AllocID"]) for r in registrations
        ):
            for registration in registrations:
                index = int(running[registration["AllocID"]]["Name"].rsplit("[", 1)[1][:-1])
                job.allocations[index] = registration["AllocID"]
                job.urls[index] = f"http://{registration['Address']}:{registration['Port']}"
            return job
        time.sleep(0.2)
    for allocation in double.allocations(JOB):
        job.allocations[int(allocation["Name"].rsplit("[", 1)[1][:-1])] = allocation["ID"]
    logs = "\n".join(f"--- executor {i}\n{job.log(i)[-3000:]}" for i in sorted(job.allocations))
    raise TimeoutError(f"{count} executors not healthy after {timeout_s:g}s:\n{logs}")
