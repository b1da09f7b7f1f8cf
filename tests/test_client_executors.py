"""One client, two real executors: each trajectory's calls, artifacts, forks and release reach
the executor it was routed to, and only that one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from atropos_agent.client import ExecutorClient, ExecutorError
from harness.servers import ExecutorServer


def trajectories_on(server: ExecutorServer) -> set[str]:
    """The trajectories the executor holds, from its own ``GET /trajectories``."""
    answer = server.client.get("/trajectories", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    return {t["trajectory_id"] for t in answer.json()["trajectories"]}


def test_each_trajectory_lives_on_the_executor_it_was_routed_to(
    executor_factory: Callable[..., ExecutorServer],
) -> None:
    first, second = executor_factory(), executor_factory()
    servers = {first.url: first, second.url: second}
    with ExecutorClient([first.url, second.url], token=first.token) as client:
        candidates = [f"two-{n}" for n in range(40)]
        home = {t: client.executor_for(t) for t in candidates}
        # Two trajectories on each executor (the pools hold four slots each).
        mine = {url: [t for t in candidates if home[t] == url][:2] for url in servers}
        assert all(len(ids) == 2 for ids in mine.values()), home
        trajectories = [t for ids in mine.values() for t in ids]

        for t in trajectories:
            written = client.execute(t, "terminal", {"command": f"echo {t} > who.txt"})
            assert written.success, written
        for url, server in servers.items():
            assert trajectories_on(server) == set(mine[url])
        for t in trajectories:
            assert client.read_artifact(t, "who.txt").content.strip() == t
            assert [e.path for e in client.list_artifacts(t).entries] == ["who.txt"]
        assert set(client.statuses()) == set(servers)

        # A fork lives on its source's executor, whatever its own id would choose.
        source = mine[first.url][0]
        fork_id = next(t for t in candidates if home[t] == second.url and t not in trajectories)
        assert client.fork(source, [fork_id]).forks[0].trajectory_id == fork_id
        assert client.executor_for(fork_id) == first.url
        assert fork_id in trajectories_on(first) and fork_id not in trajectories_on(second)
        assert client.read_artifact(fork_id, "who.txt").content.strip() == source

        for t in [*trajectories, fork_id]:
            assert client.release(t).released
        assert trajectories_on(first) == trajectories_on(second) == set()
        with pytest.raises(ExecutorError) as unknown:
            client.release(fork_id)  # released: unpinned, and routed as any new id
        assert unknown.value.status == 404
        assert client.executor_for(fork_id) == second.url
