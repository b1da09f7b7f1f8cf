"""The Nomad API test double, exercised directly over HTTP with httpx (no backend involved)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from harness.nomad_double import NomadDouble

pytest_plugins = ["harness.nomad_double.fixtures"]

S = 1_000_000_000

# A tiny HTTP server bound to NOMAD_PORT_http; it prints its NOMAD_* environment and
# answers GET with the value of $SECRET.
SERVER = r"""
import http.server, json, os
env = {k: v for k, v in os.environ.items() if k.startswith(("NOMAD_", "SECRET"))}
print(json.dumps(env), flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ.get("SECRET", "unset").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["NOMAD_PORT_http"])), Handler).serve_forever()
"""


def server_job(job_id: str, count: int = 1, **group: Any) -> dict[str, Any]:
    """A service job whose group runs SERVER under raw_exec; ``group`` overrides group fields."""
    task: dict[str, Any] = {
        "Name": "server",
        "Driver": "raw_exec",
        "Config": {"command": sys.executable, "args": ["-c", SERVER]},
        "KillTimeout": 2 * S,
    }
    task.update(group.pop("task", {}))
    tg: dict[str, Any] = {
        "Name": "sandbox",
        "Count": count,
        "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
        "Update": {"MaxParallel": 0},
        "Tasks": [task],
    }
    tg.update(group)
    return {"ID": job_id, "Type": "service", "TaskGroups": [tg]}


def exiting_job(job_id: str, code: int, **group: Any) -> dict[str, Any]:
    job = server_job(job_id, **group)
    job["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = ["-c", f"raise SystemExit({code})"]
    return job


@pytest.fixture
def api(nomad_double: NomadDouble) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=nomad_double.address, timeout=30) as client:
        yield client


def register(client: httpx.Client, job: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"Job": job, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def live(double: NomadDouble, job_id: str) -> list[dict[str, Any]]:
    allocs = [a for a in double.allocations(job_id) if a["DesiredStatus"] == "run"]
    return sorted(allocs, key=lambda a: a["Name"])


def wait_running(double: NomadDouble, job_id: str, count: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        allocs = live(double, job_id)
        if len(allocs) == count and all(a["ClientStatus"] == "running" for a in allocs):
            return allocs
        return None

    result: list[dict[str, Any]] = double.wait_until(ready, timeout_s=15)
    return result


def answer(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
    except httpx.TransportError:
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


def pid_of(double: NomadDouble, alloc_id: str) -> int:
    """The task's process id once it is running."""
    pid: int = double.wait_until(lambda: double.pids(alloc_id)["server"])
    return pid


def events(alloc: dict[str, Any], task: str = "server") -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][task]["Events"]]


def test_raw_exec_allocation_serves_on_its_dynamic_port(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    check = {"Name": "alive", "Type": "http", "Path": "/", "Interval": 10 * S, "Timeout": 2 * S}
    service = {"Name": "web-http", "PortLabel": "http", "Provider": "nomad", "Checks": [check]}
    job = server_job("web", count=2, Services=[service])
    reply = register(api, job)
    assert reply["EvalID"] and reply["JobModifyIndex"] > 0 and reply["Warnings"] == ""
    wait_running(nomad_double, "web", 2)

    stubs = api.get("/v1/job/web/allocations")
    assert stubs.status_code == 200
    assert int(stubs.headers["X-Nomad-Index"]) > 0
    assert stubs.headers["X-Nomad-KnownLeader"] == "true"
    assert stubs.headers["X-Nomad-LastContact"] == "0"
    names = sorted(a["Name"] for a in stubs.json())
    assert names == ["web.sandbox[0]", "web.sandbox[1]"]
    assert all("AllocatedResources" not in a for a in stubs.json())
    first = stubs.json()[0]
    assert first["TaskStates"]["server"]["State"] == "running"
    assert first["DeploymentStatus"] is None

    alloc = api.get(f"/v1/allocation/{first['ID']}").json()
    (port,) = alloc["AllocatedResources"]["Shared"]["Ports"]
    assert port["Label"] == "http" and port["HostIP"] == "127.0.0.1" and port["To"] == 0
    assert alloc["AllocatedResources"]["Shared"]["Networks"][0]["IP"] == "127.0.0.1"
    assert alloc["Job"]["ID"] == "web"
    assert nomad_double.wait_until(lambda: answer(port["Value"])) == "unset"

    log = nomad_double.alloc_dir(first["ID"]) / "alloc" / "logs" / "server.stdout.0"
    env = json.loads(nomad_double.wait_until(lambda: log.exists() and log.read_text()))
    root = nomad_double.alloc_dir(first["ID"])
    assert env["NOMAD_PORT_http"] == str(port["Value"]) == env["NOMAD_HOST_PORT_http"]
    assert env["NOMAD_ADDR_http"] == f"127.0.0.1:{port['Value']}"
    assert env["NOMAD_IP_http"] == "127.0.0.1"
    assert env["NOMAD_ALLOC_DIR"] == str(root / "alloc")
    assert env["NOMAD_TASK_DIR"] == str(root / "server" / "local")
    assert env["NOMAD_SECRETS_DIR"] == str(root / "server" / "secrets")
    assert env["NOMAD_ALLOC_ID"] == first["ID"]
    assert env["NOMAD_ALLOC_NAME"] == first["Name"]
    assert env["NOMAD_ALLOC_INDEX"] == first["Name"][-2]
    assert env["NOMAD_JOB_ID"] == env["NOMAD_JOB_NAME"] == "web"
    assert env["NOMAD_GROUP_NAME"] == "sandbox" and env["NOMAD_TASK_NAME"] == "server"
    assert env["NOMAD_NAMESPACE"] == "default" and env["NOMAD_REGION"] == "global"
    assert env["NOMAD_DC"] == "dc1"

    listed = api.get(
        "/v1/allocations", params={"resources": "true", "filter": 'JobID == "web"'}
    ).json()
    assert len(listed) == 2 and all(a["AllocatedResources"]["Shared"]["Ports"] for a in listed)
    both = api.get(
        "/v1/allocations",
        params={"filter": 'JobID == "web" and ClientStatus == "running" and Name != "x"'},
    ).json()
    assert len(both) == 2 and "AllocatedResources" not in both[0]
    assert api.get("/v1/allocations", params={"filter": 'JobID == "nope"'}).json() == []
    bad = api.get("/v1/allocations", params={"filter": 'JobID matches "w.*"'})
    assert bad.status_code == 400 and bad.headers["Content-Type"].startswith("text/plain")

    services = api.get("/v1/service/web-http").json()
    assert sorted(s["Port"] for s in services) == sorted(
        a["AllocatedResources"]["Shared"]["Ports"][0]["Value"] for a in listed
    )
    assert all(s["Address"] == "127.0.0.1" and s["JobID"] == "web" for s in services)
    checks = list(api.get(f"/v1/allocation/{first['ID']}/checks").json().values())
    assert [(c["Check"], c["Status"], c["Mode"]) for c in checks] == [
        ("alive", "success", "healthiness")
    ]

    job_view = api.get("/v1/job/web").json()
    assert job_view["Status"] == "running" and job_view["Version"] == 0
    assert job_view["TaskGroups"][0]["Count"] == 2 and job_view["Stop"] is False
    assert [j["ID"] for j in api.get("/v1/jobs").json()] == ["web"]
    assert api.get("/v1/status/leader").json() == "127.0.0.1:4647"
    assert set(api.get("/v1/agent/self").json()) >= {"config", "member", "stats"}


def test_template_renders_the_jobs_own_variable_only(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    put = api.put(
        "/v1/var/nomad/jobs/tmpl",
        json={"Namespace": "default", "Path": "nomad/jobs/tmpl", "Items": {"secret": "s3cret"}},
    )
    assert put.status_code == 200 and put.json()["Items"] == {"secret": "s3cret"}
    api.put("/v1/var/nomad/jobs/other", json={"Items": {"secret": "not-yours"}})
    templates = [
        {
            "EmbeddedTmpl": '{{ with nomadVar "nomad/jobs/tmpl" }}SECRET={{ .secret }}{{ end }}\n',
            "DestPath": "secrets/app.env",
            "Envvars": True,
        },
        {
            "EmbeddedTmpl": 'x={{ with nomadVar "nomad/jobs/other" }}{{ .secret }}{{ end }}',
            "DestPath": "local/other.txt",
        },
    ]
    register(api, server_job("tmpl", task={"Templates": templates}))
    (alloc,) = wait_running(nomad_double, "tmpl", 1)
    port = alloc["AllocatedResources"]["Shared"]["Ports"][0]["Value"]
    assert nomad_double.wait_until(lambda: answer(port)) == "s3cret"
    task_dir = nomad_double.alloc_dir(alloc["ID"]) / "server"
    assert (task_dir / "secrets" / "app.env").read_text() == "SECRET=s3cret\n"
    assert (task_dir / "local" / "other.txt").read_text() == "x="
    template_events = [
        e["DisplayMessage"]
        for e in alloc["TaskStates"]["server"]["Events"]
        if e["Type"] == "Template"
    ]
    assert template_events == ["Missing: nomadVar.block(nomad/jobs/other@default.global)"]

    assert api.get("/v1/var/nomad/jobs/tmpl").json()["Items"] == {"secret": "s3cret"}
    # A changed variable re-renders the template; change_mode "restart" restarts the task.
    api.put("/v1/var/nomad/jobs/tmpl", json={"Items": {"secret": "rotated"}})
    assert nomad_double.wait_until(lambda: answer(port) == "rotated")
    assert (task_dir / "secrets" / "app.env").read_text() == "SECRET=rotated\n"
    assert "Restart Signaled" in events(nomad_double.allocation(alloc["ID"]))
    listed = api.get("/v1/vars", params={"prefix": "nomad/jobs/"}).json()
    assert [v["Path"] for v in listed] == ["nomad/jobs/other", "nomad/jobs/tmpl"]
    assert "Items" not in listed[0]
    stale = api.put("/v1/var/nomad/jobs/tmpl?cas=1", json={"Items": {"secret": "x"}})
    assert stale.status_code == 409 and stale.json()["Items"] == {"secret": "rotated"}
    assert api.delete("/v1/var/nomad/jobs/other").status_code == 204
    missing = api.get("/v1/var/nomad/jobs/other")
    assert missing.status_code == 404 and missing.text == "variable not found"


def test_acl_token_is_required_on_guarded_endpoints(
    nomad_double_factory: Callable[..., NomadDouble],
) -> None:
    double = nomad_double_factory(acl_token="secret-token")
    with httpx.Client(base_url=double.address) as client:
        denied = client.get("/v1/jobs")
        assert denied.status_code == 403 and denied.text == "Permission denied"
        assert denied.headers["Content-Type"].startswith("text/plain")
        wrong = client.get("/v1/jobs", headers={"X-Nomad-Token": "nope"})
        assert wrong.status_code == 403 and wrong.text == "ACL token not found"
        assert client.post("/v1/jobs", json={"Job": server_job("x")}).status_code == 403
        assert client.get("/v1/agent/self").status_code == 403
        ok = client.get("/v1/jobs", headers={"X-Nomad-Token": "secret-token"})
        assert ok.status_code == 200 and ok.json() == []
        bearer = client.get("/v1/jobs", headers={"Authorization": "Bearer secret-token"})
        assert bearer.status_code == 200
        # Nomad documents /v1/status/leader as needing no ACL.
        assert client.get("/v1/status/leader").status_code == 200


def test_errors_are_plain_text(nomad_double: NomadDouble, api: httpx.Client) -> None:
    missing = api.get("/v1/job/nope")
    assert missing.status_code == 404 and missing.text == "job not found"
    assert missing.headers["Content-Type"].startswith("text/plain")
    assert api.get("/v1/allocation/0000").text == "alloc not found"
    assert api.post("/v1/allocation/0000/stop").status_code == 404
    assert api.get("/v1/evaluation/0000").status_code == 404
    assert api.get("/v1/job/nope/scale").status_code == 404
    assert api.get("/v1/nothing/here").status_code == 404

    no_id = api.post("/v1/jobs", json={"Job": {"TaskGroups": []}})
    assert no_id.status_code == 400 and no_id.text == "Job ID hasn't been provided"
    assert api.post("/v1/jobs", json={}).text == "Job must be specified"
    mismatch = api.post("/v1/job/other", json={"Job": server_job("web")})
    assert mismatch.status_code == 400 and mismatch.text == "Job ID does not match name"

    # Job.Validate failures are uncoded server errors: Nomad answers 500 with multierror text.
    no_groups = api.post("/v1/jobs", json={"Job": {"ID": "empty"}})
    assert no_groups.status_code == 500
    assert no_groups.text == "1 error occurred:\n\t* Missing job task groups\n\n"
    no_driver = server_job("bad")
    del no_driver["TaskGroups"][0]["Tasks"][0]["Driver"]
    invalid = api.post("/v1/jobs", json={"Job": no_driver})
    assert invalid.status_code == 500 and "Missing task driver" in invalid.text
    too_many = server_job("big", count=5, Scaling={"Min": 1, "Max": 3})
    over = api.post("/v1/jobs", json={"Job": too_many})
    assert "task group count must not be greater than maximum count" in over.text
    quick = server_job(
        "quick",
        RestartPolicy={"Interval": S, "Attempts": 1, "Delay": 0, "Mode": "fail"},
        ReschedulePolicy={"Attempts": 1, "Interval": 60 * S, "Delay": S, "Unlimited": False},
    )
    rejected = api.post("/v1/jobs", json={"Job": quick})
    assert rejected.status_code == 500
    assert "Interval can not be less than 5s (got 1s)" in rejected.text
    assert "Delay cannot be less than 5s (got 1s)" in rejected.text
    assert api.get("/v1/jobs").json() == []


def test_scale_stops_highest_indexes_and_enforces_the_policy(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    register(api, server_job("pool", count=2, Scaling={"Min": 1, "Max": 4}))
    wait_running(nomad_double, "pool", 2)

    def scale(count: int, group: str = "sandbox") -> httpx.Response:
        return api.post(
            "/v1/job/pool/scale",
            json={"Count": count, "Target": {"Group": group}, "Message": "test"},
        )

    up = scale(4)
    assert up.status_code == 200, up.text
    assert set(up.json()) >= {"EvalID", "EvalCreateIndex", "JobModifyIndex", "Index"}
    allocs = wait_running(nomad_double, "pool", 4)
    assert [a["Name"] for a in allocs] == [f"pool.sandbox[{i}]" for i in range(4)]
    keep = allocs[0]["ID"]

    assert scale(1).status_code == 200
    (remaining,) = live(nomad_double, "pool")
    assert remaining["ID"] == keep and remaining["Name"] == "pool.sandbox[0]"
    stopped = [a for a in nomad_double.allocations("pool") if a["DesiredStatus"] == "stop"]
    assert sorted(a["Name"] for a in stopped) == [f"pool.sandbox[{i}]" for i in (1, 2, 3)]
    nomad_double.wait_until(
        lambda: all(
            a["ClientStatus"] == "complete"
            for a in nomad_double.allocations("pool")
            if a["DesiredStatus"] == "stop"
        )
    )

    over = scale(5)
    assert over.status_code == 400
    assert over.text == "group count was greater than scaling policy maximum: 5 > 4"
    under = scale(0)
    assert under.text == "group count was less than scaling policy minimum: 0 < 1"
    unknown = scale(2, group="nope")
    assert unknown.status_code == 400
    assert unknown.text == 'task group "nope" specified for scaling does not exist in job'

    job = api.get("/v1/job/pool").json()
    assert job["Version"] == 2 and job["TaskGroups"][0]["Count"] == 1
    status = api.get("/v1/job/pool/scale").json()
    group = status["TaskGroups"]["sandbox"]
    assert status["JobID"] == "pool" and status["JobStopped"] is False
    assert group["Desired"] == 1 and group["Placed"] == 1 and group["Running"] == 1
    assert [e["Count"] for e in group["Events"]] == [1, 4]


def test_scaling_is_blocked_while_a_deployment_is_active(
    nomad_double_factory: Callable[..., NomadDouble],
) -> None:
    double = nomad_double_factory(deployment_seconds=1.0)
    job = server_job("dep", count=1)
    del job["TaskGroups"][0]["Update"]  # Nomad's default update strategy: MaxParallel 1
    with httpx.Client(base_url=double.address, timeout=30) as client:
        register(client, job)
        body = {"Count": 2, "Target": {"Group": "sandbox"}}
        blocked = client.post("/v1/job/dep/scale", json=body)
        assert blocked.status_code == 400
        assert blocked.text == "job scaling blocked due to active deployment"
        assert client.get("/v1/job/dep/deployment").json()["Status"] == "running"
        double.wait_until(
            lambda: client.get("/v1/job/dep/deployment").json()["Status"] == "successful"
        )
        assert client.post("/v1/job/dep/scale", json=body).status_code == 200
        again = client.post("/v1/job/dep/scale", json={**body, "Count": 3})
        assert again.status_code == 400
        allocs = wait_running(double, "dep", 2)
        assert all(a["DeploymentStatus"] is not None for a in allocs)


def test_stopped_allocation_is_replaced_at_the_same_index(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    register(api, server_job("repl", count=2))
    before = wait_running(nomad_double, "repl", 2)
    old = before[1]
    old_pid = nomad_double.pids(old["ID"])["server"]
    assert old_pid is not None
    reply = api.post(f"/v1/allocation/{old['ID']}/stop")
    assert reply.status_code == 200 and set(reply.json()) == {"EvalID", "Index"}
    after = wait_running(nomad_double, "repl", 2)
    replacement = next(a for a in after if a["ID"] not in {b["ID"] for b in before})
    assert replacement["Name"] == old["Name"] == "repl.sandbox[1]"
    assert replacement["PreviousAllocation"] == old["ID"]
    stopped = nomad_double.wait_until(
        lambda: (a := nomad_double.allocation(old["ID"]))["ClientStatus"] == "complete" and a
    )
    assert stopped["DesiredStatus"] == "stop" and stopped["NextAllocation"] == replacement["ID"]
    assert events(stopped)[-2:] == ["Killing", "Killed"]
    nomad_double.wait_until(lambda: not alive(old_pid))
    assert api.get("/v1/job/repl/scale").json()["TaskGroups"]["sandbox"]["Desired"] == 2


def test_restart_policy_then_reschedule(nomad_double: NomadDouble, api: httpx.Client) -> None:
    job = exiting_job(
        "crashy",
        code=3,
        RestartPolicy={"Attempts": 2, "Interval": 60 * S, "Delay": S // 5, "Mode": "fail"},
        ReschedulePolicy={
            "Attempts": 1,
            "Interval": 3600 * S,
            "Delay": 5 * S,  # Nomad's minimum reschedule delay
            "DelayFunction": "constant",
            "Unlimited": False,
        },
    )
    register(api, job)
    first = nomad_double.wait_until(
        lambda: next(
            (a for a in nomad_double.allocations("crashy") if a["ClientStatus"] == "failed"), None
        )
    )
    state = first["TaskStates"]["server"]
    assert state["State"] == "dead" and state["Failed"] is True and state["Restarts"] == 2
    kinds = events(first)
    assert kinds.count("Started") == 3 and kinds.count("Terminated") == 3
    assert kinds.count("Restarting") == 2 and kinds[-1] == "Not Restarting"
    assert len(kinds) == 10  # Nomad keeps the latest 10 events: "Received" has dropped off
    terminated = next(e for e in state["Events"] if e["Type"] == "Terminated")
    assert terminated["ExitCode"] == 3 and terminated["DisplayMessage"] == "Exit Code: 3"
    assert state["Events"][-1]["DisplayMessage"] == (
        'Exceeded allowed attempts 2 in interval 1m0s and mode is "fail"'
    )

    second = nomad_double.wait_until(
        lambda: next(
            (
                a
                for a in nomad_double.allocations("crashy")
                if a["PreviousAllocation"] == first["ID"]
            ),
            None,
        )
    )
    assert second["Name"] == first["Name"] and second["ID"] != first["ID"]
    assert second["RescheduleTracker"]["Events"][0]["PrevAllocID"] == first["ID"]
    assert nomad_double.allocation(first["ID"])["DesiredStatus"] == "stop"
    nomad_double.wait_until(
        lambda: nomad_double.allocation(second["ID"])["ClientStatus"] == "failed"
    )
    # One reschedule attempt only: the job ends dead with no third allocation.
    nomad_double.wait_until(lambda: api.get("/v1/job/crashy").json()["Status"] == "dead")
    assert len(nomad_double.allocations("crashy")) == 2


def test_missing_command_is_a_driver_failure(nomad_double: NomadDouble, api: httpx.Client) -> None:
    job = server_job("nocmd", task={"Config": {"command": "/nonexistent/binary"}})
    job["TaskGroups"][0]["ReschedulePolicy"] = {"Attempts": 0, "Unlimited": False}
    register(api, job)
    alloc = nomad_double.wait_until(
        lambda: next(
            (a for a in nomad_double.allocations("nocmd") if a["ClientStatus"] == "failed"), None
        )
    )
    assert events(alloc)[-2:] == ["Driver Failure", "Not Restarting"]
    assert (
        alloc["TaskStates"]["server"]["Events"][-1]["DisplayMessage"] == "Error was unrecoverable"
    )


def test_crashed_task_is_restarted_in_place(nomad_double: NomadDouble, api: httpx.Client) -> None:
    register(api, server_job("crash", RestartPolicy={"Delay": S // 10}))
    (alloc,) = wait_running(nomad_double, "crash", 1)
    pid = pid_of(nomad_double, alloc["ID"])
    assert nomad_double.kill_task(alloc["ID"]) == 1
    restarted = nomad_double.wait_until(
        lambda: (
            (a := nomad_double.allocation(alloc["ID"]))["TaskStates"]["server"]["Restarts"] == 1
            and a["ClientStatus"] == "running"
            and a
        )
    )
    terminated = [
        e for e in restarted["TaskStates"]["server"]["Events"] if e["Type"] == "Terminated"
    ]
    assert terminated[-1]["Signal"] == 9 and terminated[-1]["ExitCode"] == 137
    assert nomad_double.pids(alloc["ID"])["server"] not in (None, pid)


def test_unavailable_driver_blocks_placement(nomad_double: NomadDouble, api: httpx.Client) -> None:
    docker = {
        "ID": "dock",
        "TaskGroups": [
            {
                "Name": "web",
                "Count": 2,
                "Tasks": [{"Name": "app", "Driver": "docker", "Config": {"image": "busybox"}}],
            }
        ],
    }
    reply = register(api, docker)
    assert nomad_double.allocations("dock") == []
    ev = api.get(f"/v1/evaluation/{reply['EvalID']}").json()
    assert ev["Status"] == "complete" and ev["TriggeredBy"] == "job-register"
    failed = ev["FailedTGAllocs"]["web"]
    assert failed["ConstraintFiltered"] == {"missing drivers": 1}
    assert failed["NodesEvaluated"] == 1 and failed["NodesFiltered"] == 1
    assert failed["CoalescedFailures"] == 1 and ev["QueuedAllocations"] == {"web": 2}
    blocked = api.get(f"/v1/evaluation/{ev['BlockedEval']}").json()
    assert blocked["Status"] == "blocked"
    listed = api.get("/v1/job/dock/evaluations").json()
    assert {e["ID"] for e in listed} == {ev["ID"], blocked["ID"]}
    assert api.get("/v1/job/dock").json()["Status"] == "pending"

    # A raw_exec job on a node whose raw_exec went away waits, then runs when it is back.
    nomad_double.set_driver_available("raw_exec", False)
    register(api, server_job("later"))
    assert nomad_double.allocations("later") == []
    nomad_double.set_driver_available("raw_exec", True)
    wait_running(nomad_double, "later", 1)


def test_go_down_refuses_connections_and_come_back_serves_the_same_port(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    register(api, server_job("ha"))
    (alloc,) = wait_running(nomad_double, "ha", 1)
    port = alloc["AllocatedResources"]["Shared"]["Ports"][0]["Value"]
    address = nomad_double.address
    nomad_double.go_down()
    with pytest.raises(httpx.ConnectError):
        httpx.get(address + "/v1/status/leader", timeout=2)
    with pytest.raises(httpx.TransportError):
        api.get("/v1/jobs")  # a pooled keep-alive connection is dropped too
    assert nomad_double.wait_until(lambda: answer(port)) == "unset"
    nomad_double.come_back()
    assert nomad_double.address == address
    assert api.get("/v1/job/ha").json()["Status"] == "running"


def test_destructive_update_replaces_allocations_and_preserve_counts(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    register(api, server_job("upd", count=2))
    first = wait_running(nomad_double, "upd", 2)
    api.post("/v1/job/upd/scale", json={"Count": 3, "Target": {"Group": "sandbox"}})
    scaled = wait_running(nomad_double, "upd", 3)
    version = api.get("/v1/job/upd").json()["Version"]
    assert version == 1 and {a["ID"] for a in first} < {a["ID"] for a in scaled}

    same = register(api, server_job("upd", count=2), PreserveCounts=True)
    job = api.get("/v1/job/upd").json()
    assert job["Version"] == version and same["JobModifyIndex"] == job["JobModifyIndex"]
    assert {a["ID"] for a in live(nomad_double, "upd")} == {a["ID"] for a in scaled}

    changed = server_job("upd", count=2, task={"Env": {"SECRET": "v2"}})
    register(api, changed, PreserveCounts=True)
    replaced = wait_running(nomad_double, "upd", 3)
    assert api.get("/v1/job/upd").json()["Version"] == version + 1
    assert not {a["ID"] for a in replaced} & {a["ID"] for a in scaled}
    assert [a["Name"] for a in replaced] == [f"upd.sandbox[{i}]" for i in range(3)]
    port = replaced[0]["AllocatedResources"]["Shared"]["Ports"][0]["Value"]
    assert nomad_double.wait_until(lambda: answer(port)) == "v2"

    register(api, server_job("upd", count=2, task={"Env": {"SECRET": "v2"}}))
    assert [a["Name"] for a in wait_running(nomad_double, "upd", 2)] == [
        "upd.sandbox[0]",
        "upd.sandbox[1]",
    ]


def test_stop_and_purge_end_the_processes(nomad_double: NomadDouble, api: httpx.Client) -> None:
    register(api, server_job("gone", count=2))
    allocs = wait_running(nomad_double, "gone", 2)
    pids = [pid_of(nomad_double, a["ID"]) for a in allocs]

    stopped = api.delete("/v1/job/gone")
    assert stopped.status_code == 200
    assert set(stopped.json()) >= {"EvalID", "EvalCreateIndex", "JobModifyIndex"}
    nomad_double.wait_until(lambda: not any(alive(pid) for pid in pids))
    job = api.get("/v1/job/gone").json()
    assert job["Stop"] is True and job["Version"] == 1
    nomad_double.wait_until(lambda: api.get("/v1/job/gone").json()["Status"] == "dead")

    register(api, server_job("gone", count=1))
    (again,) = wait_running(nomad_double, "gone", 1)
    pid = pid_of(nomad_double, again["ID"])
    purged = api.delete("/v1/job/gone", params={"purge": "true"})
    assert purged.status_code == 200 and purged.json()["EvalID"]
    assert api.get("/v1/job/gone").status_code == 404
    nomad_double.wait_until(lambda: not alive(pid))
    assert all(a["DesiredStatus"] == "stop" for a in nomad_double.allocations("gone"))


def test_close_kills_every_process(nomad_double_factory: Callable[..., NomadDouble]) -> None:
    double = nomad_double_factory()
    with httpx.Client(base_url=double.address) as client:
        register(client, server_job("many", count=3))
    allocs = wait_running(double, "many", 3)
    pids = [pid_of(double, a["ID"]) for a in allocs]
    double.close()
    assert not any(alive(pid) for pid in pids)
    assert not double.root.exists()


def test_blocking_queries_wait_for_a_newer_index(
    nomad_double: NomadDouble, api: httpx.Client
) -> None:
    index = int(api.get("/v1/jobs").headers["X-Nomad-Index"])
    started = time.monotonic()
    timed_out = api.get("/v1/jobs", params={"index": index, "wait": "300ms"})
    assert 0.25 <= time.monotonic() - started < 5 and timed_out.json() == []

    results: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: results.append(api.get("/v1/jobs", params={"index": index, "wait": "5s"}))
    )
    waiter.start()
    time.sleep(0.2)
    assert results == []
    register(api, server_job("blk"))
    waiter.join(timeout=5)
    assert int(results[0].headers["X-Nomad-Index"]) > index
    assert [j["ID"] for j in results[0].json()] == ["blk"]
    assert api.get("/v1/jobs", params={"index": 1, "wait": "bogus"}).text == "Invalid wait time"


def test_jobs_are_stored_per_namespace(nomad_double_factory: Callable[..., NomadDouble]) -> None:
    double = nomad_double_factory(namespaces=["default", "team"])
    with httpx.Client(base_url=double.address) as client:
        register(client, {**server_job("ns"), "Namespace": "team"})
        assert client.get("/v1/job/ns").status_code == 404
        assert client.get("/v1/job/ns", params={"namespace": "team"}).json()["Namespace"] == "team"
        everywhere = client.get("/v1/jobs", params={"namespace": "*"}).json()
        assert [(j["ID"], j["Namespace"]) for j in everywhere] == [("ns", "team")]
        unknown = client.post("/v1/jobs", json={"Job": {**server_job("x"), "Namespace": "nope"}})
        assert unknown.status_code == 500 and "nonexistent namespace" in unknown.text
        assert client.get("/v1/jobs", params={"region": "mars"}).text == "No path to region"
