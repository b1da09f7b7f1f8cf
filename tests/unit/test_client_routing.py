"""Where the client sends each trajectory: rendezvous hashing, pins, executors marked down,
batches split per executor, and executors found through Nomad (all in memory)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

import pytest

from atropos_agent.client import ExecutorClient, routing
from atropos_agent.client.routing import DOWN_S, Router, ranked
from atropos_agent.client.transport import Answer, MockTransport, Request
from atropos_agent.errors import ExecutorUnreachable

URLS = ["http://10.0.0.1:9001", "http://10.0.0.2:9001", "http://10.0.0.3:9001"]
FOURTH = "http://10.0.0.4:9001"
IDS = [f"trajectory-{n}" for n in range(3000)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_trajectories_spread_within_a_fifth_of_even() -> None:
    spread = Counter(Router(URLS).where(t) for t in IDS)
    assert set(spread) == set(URLS)
    assert all(800 <= count <= 1200 for count in spread.values()), spread


def test_the_choice_is_stable_and_independent_of_the_order_given() -> None:
    assert [Router(URLS).where(t) for t in IDS[:50]] == [
        Router(reversed(URLS)).where(t) for t in IDS[:50]
    ]


def test_a_fourth_executor_takes_a_quarter_of_new_trajectories_and_no_pinned_one() -> None:
    router = Router(URLS)
    before = {t: router.where(t) for t in IDS}
    pinned = IDS[:300]
    for t in pinned:
        router.pin(t, before[t])
    router.set_urls([*URLS, FOURTH])
    after = {t: router.where(t) for t in IDS}
    assert all(after[t] == before[t] for t in pinned)
    moved = [t for t in IDS[300:] if after[t] != before[t]]
    assert all(after[t] == FOURTH for t in moved)  # only to the new one, never between others
    assert 0.2 <= len(moved) / len(IDS[300:]) <= 0.3, len(moved)


def test_a_new_trajectory_skips_an_executor_marked_down_until_it_is_tried_again() -> None:
    clock = Clock()
    router = Router(URLS, clock=clock)
    trajectory = IDS[0]
    first, second, _ = ranked(URLS, trajectory)
    router.mark_down(first)
    assert router.choose(trajectory) == second
    clock.now += DOWN_S
    assert router.choose(trajectory) == first


def test_a_pinned_trajectory_on_an_executor_down_is_refused_with_its_reason() -> None:
    router = Router(URLS)
    router.pin("mine", URLS[1])
    router.mark_down(URLS[1])
    with pytest.raises(ExecutorUnreachable) as refused:
        router.choose("mine")
    assert refused.value.status == 503 and refused.value.url == URLS[1]
    assert "'mine'" in refused.value.message and URLS[1] in refused.value.message
    assert router.where("mine") == URLS[1]  # never rerouted
    router.unpin("mine")
    assert router.choose("mine") != URLS[1] or ranked(URLS, "mine")[0] == URLS[1]


# ---- the client over executors in memory


class Executors:
    """Executors in memory: each answers ``/execute`` with its own URL as output, counts what
    it was sent; those in ``refusing`` refuse connections."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, object]]] = []
        self.refusing: set[str] = set()

    def handle(self, request: Request) -> Answer:
        base = next(url for url in [*URLS, FOURTH] if request.url.startswith(url))
        path = request.url.removeprefix(base)
        if base in self.refusing:
            raise ExecutorUnreachable(base, f"executor at {base} refused", sent=False)
        body = json.loads(request.body) if request.body else {}
        self.sent.append((base, path, body))
        if path == "/execute_batch":
            results = [self.result(base, call) for call in body["calls"]]
            return Answer(200, json.dumps({"results": results}).encode())
        if path == "/release" and "group" in body:
            return Answer(200, json.dumps({"group": body["group"], "released": 2}).encode())
        if path == "/release":
            return Answer(200, json.dumps({"released": True}).encode())
        if path == "/fork":
            forks = [
                {"trajectory_id": t, "sandbox_id": "s", "slot_id": "slot_0"}
                for t in body["new_trajectory_ids"]
            ]
            return Answer(200, json.dumps({"trajectory_id": "x", "forks": forks}).encode())
        return Answer(200, json.dumps(self.result(base, body)).encode())

    @staticmethod
    def result(base: str, call: dict[str, object]) -> dict[str, object]:
        return {"success": True, "output": f"{base} {call['trajectory_id']}", "metadata": {}}

    def paths_to(self, url: str) -> list[str]:
        return [path for base, path, _ in self.sent if base == url]


def client_of(executors: Executors) -> ExecutorClient:
    return ExecutorClient(URLS, retries=1, transport=MockTransport(executors.handle))


def executor_of(output: str) -> str:
    return output.split()[0]


def test_each_trajectory_s_calls_and_release_reach_its_executor() -> None:
    executors = Executors()
    with client_of(executors) as client:
        for t in IDS[:30]:
            assert executor_of(client.execute(t, "terminal").output) == client.executor_for(t)
            client.read_artifact(t, "f")
            client.release(t)
        for url in URLS:
            mine = [t for t in IDS[:30] if client.executor_for(t) == url]
            bodies = [body for base, _, body in executors.sent if base == url]
            assert {b["trajectory_id"] for b in bodies} == set(mine)
        assert not client.core.router.pins  # released: nothing pinned


def test_a_new_trajectory_goes_on_when_its_executor_refuses_a_pinned_one_does_not() -> None:
    executors = Executors()
    with client_of(executors) as client:
        home = client.executor_for("pinned")
        client.execute("pinned", "terminal")
        newcomer = next(t for t in IDS if client.executor_for(t) == home)
        executors.refusing.add(home)

        answer = client.execute(newcomer, "terminal")  # no error: its next choice
        assert executor_of(answer.output) == ranked(URLS, newcomer)[1]
        assert client.executor_for(newcomer) == ranked(URLS, newcomer)[1]

        with pytest.raises(ExecutorUnreachable) as refused:
            client.execute("pinned", "terminal")
        assert home in refused.value.message and "'pinned'" in refused.value.message
        with pytest.raises(ExecutorUnreachable):
            client.read_artifact("pinned", "f")  # its artifacts are nowhere else either
        assert client.executor_for("pinned") == home


def test_forks_live_on_their_source_s_executor() -> None:
    executors = Executors()
    with client_of(executors) as client:
        client.execute("source", "terminal")
        home = client.executor_for("source")
        children = [t for t in IDS if client.executor_for(t) != home][:5]
        client.fork("source", children)
        assert {client.executor_for(t) for t in children} == {home}
        assert {executor_of(client.execute(t, "terminal").output) for t in children} == {home}


def test_a_batch_is_split_per_executor_and_answered_in_order() -> None:
    executors = Executors()
    batch = [{"trajectory_id": t, "tool": {"name": "terminal"}} for t in IDS[:12]]
    with client_of(executors) as client:
        results = client.execute_batch(batch)
        assert [r.output.split()[1] for r in results] == IDS[:12]
        assert all(
            executor_of(r.output) == client.executor_for(t)
            for r, t in zip(results, IDS[:12], strict=True)
        )
        assert all(executors.paths_to(url) == ["/execute_batch"] for url in URLS)


def test_a_group_is_released_on_every_executor() -> None:
    executors = Executors()
    with client_of(executors) as client:
        answer = client.release_group("run-1")
        assert answer.released == 2 * len(URLS)
        assert all(executors.paths_to(url) == ["/release"] for url in URLS)


# ---- executors found through Nomad


def nomad(registrations: Callable[[], list[tuple[str, int]]], seen: list[Request]) -> MockTransport:
    def handle(request: Request) -> Answer:
        if "/v1/service/" in request.url:
            seen.append(request)
            listed = [{"Address": a, "Port": p} for a, p in registrations()]
            return Answer(200, json.dumps(listed).encode())
        return Answer(200, json.dumps({"success": True, "output": request.url}).encode())

    return MockTransport(handle)


def test_executors_are_found_through_nomad_and_found_again() -> None:
    seen: list[Request] = []
    registered = [("10.0.0.1", 9001), ("10.0.0.2", 9001)]
    client = ExecutorClient.from_nomad(
        service="tools",
        nomad_address="http://nomad:4646",
        nomad_token="secret",
        namespace="training",
        refresh_s=0.0,
        transport=nomad(lambda: registered, seen),
    )
    with client:
        assert client.executor_for("a") in URLS[:2]
        assert client.urls == URLS[:2]
        assert seen[0].url == "http://nomad:4646/v1/service/tools"
        assert seen[0].params == {"namespace": "training"}
        assert seen[0].headers["X-Nomad-Token"] == "secret"
        registered.append(("10.0.0.3", 9001))
        client.execute("b", "terminal")  # due again: refresh_s is 0, the call starts it
        client.execute("c", "terminal")
        assert client.urls == URLS


def test_no_executor_registered_is_a_clear_error() -> None:
    client = ExecutorClient.from_nomad(service="tools", transport=nomad(list, []))
    with client, pytest.raises(ExecutorUnreachable) as none:
        client.execute("a", "terminal")
    assert "no executor is registered in Nomad as service 'tools'" in none.value.message


def test_pins_are_bounded_and_the_oldest_goes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "MAX_PINS", 3)
    router = routing.Router(["http://a", "http://b"])
    for n in range(5):
        router.pin(f"t{n}", "http://a")
    assert list(router.pins) == ["t2", "t3", "t4"]
