"""The Nomad backend against a real cluster: runs only when NOMAD_ADDR is set.

For a `nomad agent -dev` on this host (raw_exec enabled, this Python with the package
installed): `NOMAD_ADDR=http://127.0.0.1:4646 python -m pytest tests/test_nomad_real.py`.
Set NOMAD_TOKEN on a cluster with ACLs, and TEST_NOMAD_DRIVER=docker with
TOOL_EXECUTOR_IMAGE to try the docker driver.
"""

from __future__ import annotations

import os
import sys
import uuid

import nomad
import pytest

from harness.servers import start_executor

pytestmark = pytest.mark.skipif(
    not os.environ.get("NOMAD_ADDR"), reason="needs a real Nomad cluster (set NOMAD_ADDR)"
)


def test_pool_on_a_real_cluster() -> None:
    job_id = f"atropos-test-{uuid.uuid4().hex[:8]}"
    driver = os.environ.get("TEST_NOMAD_DRIVER", "raw_exec")
    env = {
        "TOOL_EXECUTOR_BACKEND": "nomad",
        "TOOL_EXECUTOR_NOMAD_ADDRESS": os.environ["NOMAD_ADDR"],
        "TOOL_EXECUTOR_JOB_ID": job_id,
        "TOOL_EXECUTOR_NOMAD_DRIVER": driver,
        "TOOL_EXECUTOR_NOMAD_RAW_EXEC_COMMAND": sys.executable,
        "TOOL_EXECUTOR_SLOTS": "2",
        "TOOL_EXECUTOR_MIN_CONTAINERS": "1",
        "TOOL_EXECUTOR_MAX_CONTAINERS": "2",
        "TOOL_EXECUTOR_SANDBOX_START_TIMEOUT_S": "180",
    }
    server = start_executor(backend="local", env=env)
    try:
        result = server.sh("real", "echo hello from nomad")
        assert result["success"] and result["output"] == "hello from nomad"
        assert server.status()["pool"]["backend"]["job_id"] == job_id
    finally:
        server.stop()
    api = nomad.Nomad(address=os.environ["NOMAD_ADDR"], token=os.environ.get("NOMAD_TOKEN"))
    with pytest.raises(nomad.api.exceptions.URLNotFoundNomadException):
        api.job.get_job(job_id)
