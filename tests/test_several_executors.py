"""Three executors of one Nomad job (count = 3) behind one client.

The executors run as a job on the Nomad API double (harness/executor_job.py), as
nomad/tool-executor.nomad.hcl runs them on a cluster: each derives its pool job from its
allocation index and registers the service the client discovers them by. The client routes
each new trajectory by rendezvous hashing and keeps it on its executor; losing an executor
fails only that executor's trajectories, clearly, and new ones go to the others.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from atropos_agent.client import ExecutorClient
from atropos_agent.errors import ExecutorError
from harness.executor_job import SERVICE, ExecutorJob, run_executors
from harness.nomad_double import NomadDouble
from harness.servers import NOMAD_ACL_TOKEN, TOKEN
from tests.executor_support import settings

POOL = "atropos-sandbox-tool-executor"
LIVE = 60


@pytest.fixture
def executors() -> Iterator[ExecutorJob]:
    """Three executors on a double of their own; closing it ends every process they started."""
    host_env = {k: v for k, v in os.environ.items() if not k.startswith("TOOL_EXECUTOR_")}
    double = NomadDouble(acl_token=NOMAD_ACL_TOKEN, host_env=host_env).start()
    try:
        yield run_executors(
            double,
            3,
            # Room for every live trajectory from the start (60 spread over three executors):
            # scaling is the pool's own business, tested elsewhere.
            settings(
                slots="16",
                min_containers="2",
                max_containers="3",
                health_interval_s="0.5",
            ),
        )
    finally:
        double.close()
    assert not double.internal_errors, double.internal_errors[0]


def trajectories_on(url: str) -> set[str]:
    """The trajectories the executor at ``url`` holds, from its own ``/trajectories``."""
    answer = httpx.get(
        f"{url}/trajectories",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return {t["trajectory_id"] for t in answer.json()["trajectories"]}


def test_three_executors_share_trajectories_and_lose_only_their_own(
    executors: ExecutorJob,
) -> None:
    double, urls = executors.double, executors.urls
    pool_of = {url: f"{POOL}-{index}" for index, url in urls.items()}
    # Each executor registered a pool job of its own, named after its allocation index.
    for index, url in urls.items():
        assert double.job(f"{POOL}-{index}") is not None
        status = httpx.get(
            f"{url}/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ).json()
        assert status["pool"]["backend"]["job_id"] == f"{POOL}-{index}"
    assert double.job(POOL) is None

    client = ExecutorClient.from_nomad(
        service=SERVICE,
        nomad_address=double.address,
        nomad_token=NOMAD_ACL_TOKEN,
        token=TOKEN,
        refresh_s=0.5,
    )
    with client:
        assert set(client.statuses()) == set(urls.values())

        # Rendezvous hashing spreads ids evenly. Measured over many ids: the executors' URLs
        # (hence the split) change with their ports, and 60 ids land within 20% of even only
        # about half the time.
        spread = Counter(client.executor_for(f"spread-{i}") for i in range(3000))
        assert set(spread) == set(urls.values())
        assert all(800 <= count <= 1200 for count in spread.values()), spread

        # Sixty trajectories, each leased where the client routes it.
        live = [f"trajectory-{i}" for i in range(LIVE)]
        home = {trajectory: client.executor_for(trajectory) for trajectory in live}
        assert set(home.values()) == set(urls.values())

        def first_call(trajectory: str) -> None:
            result = client.execute(
                trajectory, "terminal", {"command": f"echo {trajectory} > mine.txt; cat mine.txt"}
            )
            assert result.success and result.output == trajectory, result
            # The slot is one of its executor's own pool.
            sandbox = double.allocation(result.metadata["sandbox_id"])
            assert sandbox["JobID"] == pool_of[home[trajectory]], (trajectory, sandbox["JobID"])

        with ThreadPoolExecutor(12) as threads:
            list(threads.map(first_call, live))
        for url in urls.values():
            assert trajectories_on(url) == {t for t in live if home[t] == url}
        for trajectory in live:
            artifact = client.read_artifact(trajectory, "mine.txt")
            assert artifact.success and artifact.content.strip() == trajectory

        # New ids routed, before the crash, to the executor about to go.
        lost_index = 1
        lost_url = urls[lost_index]
        rerouted = [f"new-{i}" for i in range(200) if client.executor_for(f"new-{i}") == lost_url]
        rerouted = rerouted[:10]
        assert rerouted

        executors.crash(lost_index)
        survivors = {url for url in urls.values() if url != lost_url}

        # Its own trajectories fail, and the error names the executor.
        victims = [t for t in live if home[t] == lost_url]
        assert victims
        with pytest.raises(ExecutorError) as failed_call:
            client.execute(victims[0], "terminal", {"command": "cat mine.txt"})
        assert lost_url in str(failed_call.value)
        with pytest.raises(ExecutorError) as failed_read:
            client.read_artifact(victims[-1], "mine.txt")
        assert lost_url in str(failed_read.value)

        # Every other trajectory keeps its workspace, its artifacts, and releases where it lives.
        def carry_on(trajectory: str) -> None:
            result = client.execute(trajectory, "terminal", {"command": "cat mine.txt"})
            assert result.success and result.output == trajectory, result
            assert client.read_artifact(trajectory, "mine.txt").content.strip() == trajectory
            assert client.release(trajectory).released

        others = [t for t in live if home[t] != lost_url]
        with ThreadPoolExecutor(12) as threads:
            list(threads.map(carry_on, others))
        for url in survivors:
            assert not trajectories_on(url) & set(others)

        # New trajectories go to the other two, the lost executor's share included.
        def new_trajectory(trajectory: str) -> str:
            result = client.execute(trajectory, "terminal", {"command": "echo fresh"})
            assert result.success and result.output == "fresh", result
            job_id = double.allocation(result.metadata["sandbox_id"])["JobID"]
            assert client.release(trajectory).released
            return str(job_id)

        fresh = rerouted + [f"fresh-{i}" for i in range(20)]
        with ThreadPoolExecutor(12) as threads:
            pools = list(threads.map(new_trajectory, fresh))
        assert set(pools) <= {pool_of[url] for url in survivors}, Counter(pools)
        assert all(client.executor_for(t) in survivors for t in fresh)

        # Nomad no longer lists the lost executor, and the client follows it.
        assert {f"http://{r['Address']}:{r['Port']}" for r in executors.registrations()} == (
            survivors
        )
