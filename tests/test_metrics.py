"""Prometheus metrics of both servers against real processes, and the files built on them: the
Grafana dashboard, the Prometheus scrape config and the Nomad Autoscaler policy
(docs/operations.md, "Metrics")."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import httpx
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML: comes with uvicorn[standard]
from hcl2.utils import SerializationOptions
from prometheus_client.parser import text_string_to_metric_families

from atropos_agent import __version__
from atropos_agent.executor.backends.nomad_job import GROUP
from atropos_agent.executor.settings import ExecutorSettings
from harness.servers import (
    DEFAULT_BACKEND,
    ExecutorServer,
    SandboxServer,
    free_port,
    start_executor,
)
from tests.executor_support import (
    Background,
    local_backend_only,
    new_client,
    settings,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "atropos-executor.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
AUTOSCALER_POLICY = ROOT / "nomad" / "autoscaler-policy.hcl"
EXECUTOR_JOB = ROOT / "nomad" / "tool-executor.nomad.hcl"
HCL_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=False, preserve_heredocs=True, strip_string_quotes=True
)
METRIC_NAME = re.compile(r"\batropos_[a-z0-9_]+")
SELECTOR = re.compile(r"(atropos_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\bby \(([\w, ]+)\) \((?:\w+\()?(atropos_[a-z0-9_]+)")


@dataclass
class Scrape:
    """One scrape: every sample's value by name and labels, and each name's label names."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    labels: dict[str, set[str]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[(sample.name, frozenset(sample.labels.items()))] = sample.value
                labels.setdefault(sample.name, set()).update(sample.labels)
        return cls(values, labels)

    def value(self, name: str, **labels: str) -> float:
        return self.values[(name, frozenset(labels.items()))]

    def total(self, name: str) -> float:
        """The sum of every sample of ``name``."""
        return sum(value for (found, _), value in self.values.items() if found == name)


def scrape(client: httpx.Client, url: str = "/metrics") -> Scrape:
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape.parse(response.text)


# ---- the executor after known traffic


@dataclass
class Served:
    server: ExecutorServer
    metrics_port: int
    # The scrape taken right after the traffic below.
    after: Scrape


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """An executor (one sandbox of 4 slots) with a metrics port, after 5 successful terminal
    calls on two trajectories, one that exits 3 and one to a tool nobody serves."""
    port = free_port()
    server = start_executor(env=settings(metrics_port=str(port)))
    try:
        for trajectory, count in (("metrics-a", 3), ("metrics-b", 2)):
            for _ in range(count):
                assert server.sh(trajectory, "echo fine")["success"]
        failed = server.sh("metrics-b", "exit 3")
        assert failed["metadata"]["error_kind"] == "tool_failed"
        unknown = server.call("metrics-a", "no_such_tool")
        assert unknown["metadata"]["error_kind"] == "bad_request"
        yield Served(server, port, scrape(server.client))
    finally:
        server.stop()


def test_a_scrape_counts_calls_by_tool_and_outcome(served: Served) -> None:
    after = served.after
    calls = "atropos_executor_calls_total"
    assert after.value(calls, tool="terminal", outcome="ok") == 5
    assert after.value(calls, tool="terminal", outcome="tool_failed") == 1
    # A tool name nobody serves is labelled "other": label values stay bounded.
    assert after.value(calls, tool="other", outcome="bad_request") == 1
    assert after.total(calls) == 7
    duration = "atropos_executor_call_duration_seconds"
    assert after.value(duration + "_count", tool="terminal") == 6
    assert after.value(duration + "_count", tool="other") == 1
    # Only the six terminal calls reached the sandbox; each went alone, as its own batch.
    assert after.value("atropos_executor_sandbox_duration_seconds_count", tool="terminal") == 6
    assert after.value("atropos_executor_batch_calls_count") == 6
    assert after.value("atropos_executor_batch_calls_sum") == 6
    # One lease per trajectory, both free at once.
    assert after.value("atropos_executor_slot_wait_seconds_count") == 2
    assert after.value("atropos_executor_slot_wait_seconds_bucket", le="0.001") == 2
    assert after.total("atropos_executor_calls_refused_total") == 0
    assert after.total("atropos_executor_scale_requests_total") == 0
    assert after.total("atropos_executor_sandbox_retirements_total") == 0


def test_a_scrape_shows_what_the_pool_holds(served: Served) -> None:
    after = served.after
    assert after.value("atropos_executor_calls_in_service") == 0
    assert after.value("atropos_executor_trajectories") == 2
    assert after.value("atropos_executor_leases") == 2
    assert after.value("atropos_executor_slot_waiters") == 0
    assert after.value("atropos_executor_slots", state="acquired") == 2
    assert after.value("atropos_executor_slots", state="available") == 2
    assert after.value("atropos_executor_sandboxes", state="ready") == 1
    assert after.value("atropos_executor_sandboxes", state="not_ready") == 0
    job_id = ExecutorSettings(_env_file=None).job_id
    assert after.value("atropos_executor_sandboxes_wanted", job_id=job_id) == 1
    info = {"version": __version__, "backend": DEFAULT_BACKEND, "scaling": "executor"}
    assert after.value("atropos_executor_info", **info) == 1


def test_metrics_ask_for_the_token_like_status(served: Served) -> None:
    url = served.server.url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_the_metrics_port_answers_without_a_token_and_nothing_else(served: Served) -> None:
    base = f"http://127.0.0.1:{served.metrics_port}"
    with httpx.Client(base_url=base, timeout=10) as client:
        plain = scrape(client)
        assert plain.value("atropos_executor_calls_total", tool="terminal", outcome="ok") == 5
        assert plain.labels.keys() == served.after.labels.keys()
        openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")
        assert client.get("/status").status_code == 404
        assert client.post("/execute", json={}).status_code in (404, 405)


def test_the_metrics_port_closes_with_the_executor(executor_factory: Any) -> None:
    port = free_port()
    server = executor_factory(env=settings(metrics_port=str(port)))
    url = f"http://127.0.0.1:{port}/metrics"
    assert httpx.get(url, timeout=10).status_code == 200
    server.stop()
    assert "Application shutdown complete" in server.log()
    assert "metrics_port_stop_overran" not in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=10)


@local_backend_only
def test_a_killed_sandbox_shows_as_a_retirement(executor_factory: Any) -> None:
    server: ExecutorServer = executor_factory(env=settings())
    first = server.sh("doomed", "true")
    status = server.status()
    pid = next(
        child["pid"]
        for child in status["pool"]["backend"]["children"]
        if child["sandbox_id"] == first["metadata"]["sandbox_id"]
    )
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server.status()["pool"]["lost_sandboxes"] == 1, 15, "the loss noticed")
    lost = server.sh("doomed", "true")
    assert lost["metadata"]["error_kind"] == "workspace_lost"

    after = scrape(server.client)
    retired = "atropos_executor_sandbox_retirements_total"
    # Whichever the pool saw first: the backend no longer listing it, or its health failing.
    assert after.value(retired, cause="gone") + after.value(retired, cause="unhealthy") == 1
    assert after.value(retired, cause="scaled_down") == 0
    assert after.value(retired, cause="unhealthy") == after.value(
        "atropos_executor_sandbox_replacements_total"
    )
    calls = "atropos_executor_calls_total"
    assert after.value(calls, tool="terminal", outcome="workspace_lost") == 1


# ---- the sandbox server


def test_a_sandbox_server_counts_calls_limits_and_refusals(sandbox_factory: Any) -> None:
    server: SandboxServer = sandbox_factory(slots=2)
    for _ in range(2):
        assert server.sh("slot_0", "echo fine")["success"]
    timed_out = server.sh("slot_1", "sleep 5", timeout=0.5)
    assert timed_out["metadata"]["limit_hit"] == ["timeout"]
    flooded = server.sh("slot_0", "head -c 200000 /dev/zero | tr '\\0' a")
    assert flooded["success"] and flooded["metadata"]["limit_hit"] == ["output"]
    refused = server.run("slot_9", "terminal", command="true")
    assert not refused["success"] and "Unknown slot" in refused["error"]

    after = scrape(server.client)
    calls = "atropos_sandbox_calls_total"
    assert after.value(calls, tool="terminal", outcome="ok") == 3
    assert after.value(calls, tool="terminal", outcome="timeout") == 1
    assert after.value("atropos_sandbox_calls_refused_total") == 1
    assert after.value("atropos_sandbox_limits_hit_total", limit="timeout") == 1
    assert after.value("atropos_sandbox_limits_hit_total", limit="output") == 1
    assert after.value("atropos_sandbox_limits_hit_total", limit="memory") == 0
    assert after.value("atropos_sandbox_slots", state="idle") == 2
    assert after.value("atropos_sandbox_slots", state="busy") == 0
    assert after.value("atropos_sandbox_calls_pending") == 0
    assert after.value("atropos_sandbox_slot_restarts_total") == 0
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_a_scrape_sees_a_busy_slot(sandbox_factory: Any) -> None:
    server: SandboxServer = sandbox_factory(slots=2)
    running = Background(lambda: server.sh("slot_0", "sleep 1.5"))

    def busy() -> Scrape | None:
        seen = scrape(server.client)
        return seen if seen.value("atropos_sandbox_slots", state="busy") == 1 else None

    during = wait_for(busy, 10, "slot_0 busy in a scrape")
    assert during.value("atropos_sandbox_slots", state="idle") == 1
    assert during.value("atropos_sandbox_calls_pending") == 1
    assert running.result()["success"]


# ---- scaling from outside


def test_with_external_scaling_the_executor_leaves_the_count_to_the_gauge(
    executor_factory: Any,
) -> None:
    server: ExecutorServer = executor_factory(
        env=settings(slots="2", max_containers="2", acquire_timeout_s="3", scaling="external")
    )
    for trajectory in ("full-1", "full-2"):
        assert server.sh(trajectory, "true")["success"]
    with new_client(server) as client:
        waiting = Background(
            lambda: client.post(
                "/execute",
                json={
                    "trajectory_id": "full-3",
                    "tool": {"name": "terminal", "arguments": {"command": "true"}},
                },
            ).json()
        )

        def waiter_seen() -> Scrape | None:
            seen = scrape(server.client)
            return seen if seen.value("atropos_executor_slot_waiters") == 1 else None

        during = wait_for(waiter_seen, 10, "a call waiting for a slot")
        job_id = ExecutorSettings(_env_file=None).job_id
        # Two leases and one waiter on sandboxes of 2 slots: 2 sandboxes wanted, 1 running.
        assert during.value("atropos_executor_sandboxes_wanted", job_id=job_id) == 2
        result = waiting.result()
    assert result["metadata"]["error_kind"] == "no_slot"
    assert "scaled from outside" in result["error"]
    after = scrape(server.client)
    assert after.value("atropos_executor_sandboxes", state="ready") == 1
    assert after.total("atropos_executor_scale_requests_total") == 0
    assert server.status()["pool"]["containers"] == 1


# ---- the files built on the metrics


def target_labels() -> set[str]:
    """Labels Prometheus puts on every scraped sample: its own and those the scrape config
    adds by relabelling."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    added = {
        rule["target_label"]
        for job in config["scrape_configs"]
        for rule in job.get("relabel_configs", [])
        if "target_label" in rule
    }
    return {"instance", "job"} | added


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            queries += [target["expr"] for target in inner.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for subject in ("throughput", "p99", "errors by kind", "leases", "sandboxes", "scale"):
        assert subject in titles


def test_every_dashboard_query_names_exported_metrics_and_labels(
    served: Served, sandbox: SandboxServer
) -> None:
    assert sandbox.sh("slot_0", "true")["success"]  # so that its calls have a series
    exported = Scrape.parse("")
    for seen in (served.after, scrape(sandbox.client)):
        exported.labels.update(seen.labels)
    added = target_labels()
    queries = dashboard_queries()
    named = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert len(named) > 20
    assert not named - exported.labels.keys(), "the dashboard names metrics nobody exports"
    for query in queries:
        for name, matchers in SELECTOR.findall(query):
            for label in MATCHER.findall(matchers):
                assert label in exported.labels[name] | added, (query, label)
        for grouping, name in GROUPING.findall(query):
            for label in grouping.split(","):
                assert label.strip() in exported.labels[name] | added, (query, label)


def test_the_autoscaler_policy_passes_the_wanted_gauge_through(served: Served) -> None:
    with AUTOSCALER_POLICY.open() as handle:
        document = hcl2.load(handle, serialization_options=HCL_OPTIONS)
    ((scaling,),) = [list(block.values()) for block in document["scaling"]]
    defaults = ExecutorSettings(_env_file=None)
    assert scaling["enabled"] is True
    assert (scaling["min"], scaling["max"]) == (defaults.min_containers, defaults.max_containers)
    (policy,) = scaling["policy"]
    ((check,),) = [list(block.values()) for block in policy["check"]]
    assert check["source"] == "prometheus"
    assert [list(strategy) for strategy in check["strategy"]] == [["pass-through"]]
    ((target_name, target),) = [next(iter(block.items())) for block in policy["target"]]
    assert target_name == "nomad-target"
    assert (target["Job"], target["Group"]) == (defaults.job_id, GROUP)

    query = check["query"].replace('\\"', '"')
    assert query == f'max(atropos_executor_sandboxes_wanted{{job_id="{defaults.job_id}"}})'
    # The series the query selects is there, with a count within the policy's bounds.
    wanted = served.after.value("atropos_executor_sandboxes_wanted", job_id=defaults.job_id)
    assert scaling["min"] <= wanted <= scaling["max"]


def test_the_scrape_config_finds_both_services_in_nomad() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    with EXECUTOR_JOB.open() as handle:
        executor_job = hcl2.load(handle, serialization_options=HCL_OPTIONS)
    ((job_body,),) = [list(job.values()) for job in executor_job["job"]]
    ((group,),) = [list(group.values()) for group in job_body["group"]]
    services = {service["name"]: service["port"] for service in group["service"]}
    metrics_service = next(name for name, port in services.items() if port == "metrics")
    kept = {
        name: next(r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep")
        for name, job in jobs.items()
    }
    assert kept == {
        "atropos-executor": metrics_service,
        "atropos-sandbox": ExecutorSettings(_env_file=None).nomad_service_name,
    }
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        assert job["nomad_sd_configs"]
    # The sandboxes' /metrics asks for their token; the metrics port does not.
    assert "authorization" in jobs["atropos-sandbox"]
    assert "authorization" not in jobs["atropos-executor"]
