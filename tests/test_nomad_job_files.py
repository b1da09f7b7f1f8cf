"""The deployment files agree with the code: nomad/*.nomad.hcl, Dockerfile, deploy/.

The sandbox job files must describe the job ``build_job`` registers (for the default settings,
docker and raw_exec). They are parsed with python-hcl2: blocks become lists of dicts, a
block's labels become keys, and with ``strip_string_quotes`` strings come back bare, while
expressions such as ``var.image`` come back as ``"${var.image}"``; the helpers below resolve
those against the file's variable defaults, as ``nomad job run`` without ``-var`` would.

No container engine and no Nomad here: images and jobs are checked by what can be read and
run without them (the images' entry points are what the other tests start directly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import textwrap
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions
from pydantic import AliasChoices

from atropos_agent.executor.backends.nomad_job import GROUP, PORT_LABEL, TASK, build_job
from atropos_agent.executor.settings import ExecutorSettings

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_JOB = ROOT / "nomad" / "sandbox.nomad.hcl"
SANDBOX_RAW_EXEC_JOB = ROOT / "nomad" / "sandbox-raw-exec.nomad.hcl"
EXECUTOR_JOB = ROOT / "nomad" / "tool-executor.nomad.hcl"
DEPLOY_SCRIPTS = sorted((ROOT / "deploy").glob("*.sh"))
SECOND = 1_000_000_000
DURATION = re.compile(r"(\d+)(ns|us|ms|s|m|h)")
UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": SECOND, "m": 60 * SECOND, "h": 3600 * SECOND}
VAR_REF = re.compile(r"\$\{var\.(\w+)\}")
HEREDOC = re.compile(r"<<(-?)(\w+)\n(.*)\n[ \t]*\2", re.DOTALL)


# ---- reading HCL the way Nomad would


class JobFile:
    def __init__(self, path: Path) -> None:
        options = SerializationOptions(
            with_comments=False,
            explicit_blocks=False,
            preserve_heredocs=True,
            strip_string_quotes=True,
        )
        with path.open() as handle:
            self.doc: dict[str, Any] = hcl2.load(handle, serialization_options=options)
        self.defaults: dict[str, Any] = {}
        for variable in self.doc.get("variable", []):
            for name, body in variable.items():
                assert "default" in body, f"{path.name}: variable {name} needs a default"
                self.defaults[name] = self.value(body["default"])
        ((self.job_id, self.job),) = labeled(self.doc, "job").items()

    def value(self, raw: Any) -> Any:
        """``raw`` with ``var.x`` resolved to its default, heredocs decoded."""
        if isinstance(raw, list):
            return [self.value(item) for item in raw]
        if not isinstance(raw, str):
            return raw
        heredoc = HEREDOC.fullmatch(raw)
        if heredoc:
            body = heredoc.group(3) + "\n"
            return textwrap.dedent(body) if heredoc.group(1) else body
        whole = VAR_REF.fullmatch(raw)
        if whole:
            return self.defaults[whole.group(1)]
        if raw == "${jsonencode(var.datacenters)}":
            return json.dumps(self.defaults["datacenters"])
        return VAR_REF.sub(lambda match: hcl_text(self.defaults[match.group(1)]), raw)

    def values(self, body: dict[str, Any]) -> dict[str, Any]:
        return {key: self.value(raw) for key, raw in body.items()}

    def env(self, task: dict[str, Any]) -> dict[str, str]:
        """A task's env block: Nomad converts every value to a string."""
        return {key: hcl_text(value) for key, value in self.values(block(task, "env")).items()}


def hcl_text(value: Any) -> str:
    """A value as HCL renders it inside a string: booleans lowercase."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def block(parent: dict[str, Any], name: str) -> dict[str, Any]:
    """The one unlabeled block ``name`` of ``parent``."""
    blocks = parent.get(name)
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected one {name} block"
    found: dict[str, Any] = blocks[0]
    return found


def labeled(parent: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Every ``name "label" {...}`` block of ``parent``, by label."""
    found: dict[str, dict[str, Any]] = {}
    for item in parent.get(name, []):
        for label, body in item.items():
            assert label not in found, f"two {name} blocks labeled {label}"
            found[label] = body
    return found


def nanoseconds(duration: str) -> int:
    parts = DURATION.findall(duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(int(number) * UNITS[unit] for number, unit in parts)


# ---- the sandbox pool job


def sandbox_cases() -> list[Any]:
    """Each job file with the settings (beyond the defaults) it stands for."""
    return [
        pytest.param(SANDBOX_JOB, {}, id="docker"),
        pytest.param(SANDBOX_RAW_EXEC_JOB, {"nomad_driver": "raw_exec"}, id="raw_exec"),
    ]


@pytest.fixture(autouse=True)
def no_executor_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults only: no TOOL_EXECUTOR_* or NOMAD_* from the environment running the tests."""
    for name in list(os.environ):
        if name.startswith(("TOOL_EXECUTOR_", "NOMAD_")):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("path", "overrides"), sandbox_cases())
def test_sandbox_job_file_is_the_job_the_executor_registers(
    path: Path, overrides: dict[str, Any]
) -> None:
    settings = ExecutorSettings(_env_file=None, **overrides)
    expected = build_job(settings.nomad())
    hcl = JobFile(path)
    job = hcl.values(hcl.job)

    assert hcl.job_id == expected["ID"] == settings.job_id
    assert job["type"] == expected["Type"]
    assert job["datacenters"] == expected["Datacenters"]
    assert "namespace" not in job and "Namespace" not in expected
    assert "region" not in job and "Region" not in expected

    ((group_name, group_hcl),) = labeled(hcl.job, "group").items()
    (want,) = expected["TaskGroups"]
    assert group_name == want["Name"] == GROUP
    assert hcl.value(group_hcl["count"]) == want["Count"]

    scaling = hcl.values(block(group_hcl, "scaling"))
    assert scaling == {
        "enabled": want["Scaling"]["Enabled"],
        "min": want["Scaling"]["Min"],
        "max": want["Scaling"]["Max"],
    }
    assert hcl.values(block(group_hcl, "update")) == {"max_parallel": want["Update"]["MaxParallel"]}

    restart = hcl.values(block(group_hcl, "restart"))
    assert restart["attempts"] == want["RestartPolicy"]["Attempts"]
    assert restart["mode"] == want["RestartPolicy"]["Mode"]
    assert nanoseconds(restart["interval"]) == want["RestartPolicy"]["Interval"]
    assert nanoseconds(restart["delay"]) == want["RestartPolicy"]["Delay"]

    reschedule = hcl.values(block(group_hcl, "reschedule"))
    policy = want["ReschedulePolicy"]
    assert reschedule["attempts"] == policy["Attempts"]
    assert nanoseconds(reschedule.get("interval", "0s")) == policy["Interval"]
    assert nanoseconds(reschedule["delay"]) == policy["Delay"]
    assert reschedule["delay_function"] == policy["DelayFunction"]
    assert nanoseconds(reschedule["max_delay"]) == policy["MaxDelay"]
    assert reschedule["unlimited"] is policy["Unlimited"]

    network = block(group_hcl, "network")
    (want_network,) = want["Networks"]
    assert network.get("mode", "host") == want_network["Mode"]
    ports = labeled(network, "port")
    (want_port,) = want_network["DynamicPorts"]
    assert list(ports) == [want_port["Label"]] == [PORT_LABEL]
    assert ports[PORT_LABEL].get("to") == want_port.get("To")
    assert "static" not in ports[PORT_LABEL]

    service = block(group_hcl, "service")
    (want_service,) = want["Services"]
    assert hcl.value(service["name"]) == want_service["Name"]
    assert service["port"] == want_service["PortLabel"]
    assert service["provider"] == want_service["Provider"] == "nomad"
    check = hcl.values(block(service, "check"))
    (want_check,) = want_service["Checks"]
    assert check["name"] == want_check["Name"]
    assert check["type"] == want_check["Type"] == "http"
    assert check["path"] == want_check["Path"] == "/health"
    assert nanoseconds(check["interval"]) == want_check["Interval"]
    assert nanoseconds(check["timeout"]) == want_check["Timeout"]

    ((task_name, task),) = labeled(group_hcl, "task").items()
    (want_task,) = want["Tasks"]
    assert task_name == want_task["Name"] == TASK
    assert task["driver"] == want_task["Driver"] == settings.nomad_driver
    assert hcl.values(block(task, "config")) == want_task["Config"]
    assert hcl.env(task) == want_task["Env"]

    template = hcl.values(block(task, "template"))
    (want_template,) = want_task["Templates"]
    assert template["data"] == want_template["EmbeddedTmpl"]
    assert template["destination"] == want_template["DestPath"]
    assert template["env"] is want_template["Envvars"] is True
    assert template["change_mode"] == want_template["ChangeMode"]

    resources = hcl.values(block(task, "resources"))
    assert resources == {
        "cpu": want_task["Resources"]["CPU"],
        "memory": want_task["Resources"]["MemoryMB"],
    }
    assert nanoseconds(task["kill_timeout"]) == want_task["KillTimeout"]


def test_sandbox_job_files_share_their_variables() -> None:
    docker, raw_exec = JobFile(SANDBOX_JOB), JobFile(SANDBOX_RAW_EXEC_JOB)
    assert set(docker.defaults) - set(raw_exec.defaults) == {"image", "privileged"}
    assert set(raw_exec.defaults) - set(docker.defaults) == {"command"}
    for name in set(docker.defaults) & set(raw_exec.defaults):
        assert docker.defaults[name] == raw_exec.defaults[name], name


# ---- the executor job


def test_executor_job_file_configures_a_nomad_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    hcl = JobFile(EXECUTOR_JOB)
    job = hcl.values(hcl.job)
    assert job["type"] == "service"
    ((_, group),) = labeled(hcl.job, "group").items()
    # `-var executors=N` runs N executors, one by default.
    assert group["count"] == "${var.executors}"
    assert hcl.value(group["count"]) == 1

    ports = labeled(block(group, "network"), "port")
    port = ports["http"]
    services = {service["name"]: service for service in group["service"]}
    service = services["atropos-tool-executor"]
    assert service["port"] == "http" and service["provider"] == "nomad"
    # Prometheus finds the metrics port by this service (deploy/prometheus/prometheus.yml).
    metrics_service = services["atropos-tool-executor-metrics"]
    assert metrics_service["port"] == "metrics" and metrics_service["provider"] == "nomad"
    # Trainers' clients discover the executors by this service; Nomad checks each one.
    check = block(service, "check")
    assert (check["type"], check["path"]) == ("http", "/health")
    assert nanoseconds(check["interval"]) > 0 and nanoseconds(check["timeout"]) > 0

    ((_, task),) = labeled(group, "task").items()
    assert task["driver"] == "docker"
    config = hcl.values(block(task, "config"))
    assert config["ports"] == ["http", "metrics"]

    env = hcl.env(task)
    assert not [name for name in env if "TOKEN" in name], "tokens belong in the Variable"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ExecutorSettings(_env_file=None)
    assert settings.backend == "nomad"
    assert settings.host == "0.0.0.0"
    assert settings.port == port["to"] == 9001
    assert settings.metrics_port == ports["metrics"]["to"]
    assert settings.metrics_host == "0.0.0.0"
    assert settings.nomad_address == "http://${attr.unique.network.ip-address}:4646"
    defaults = ExecutorSettings(_env_file=None, backend="nomad")
    # The pool this executor registers is the one nomad/sandbox.nomad.hcl describes.
    assert settings.job_id == defaults.job_id == JobFile(SANDBOX_JOB).job_id
    assert settings.image == defaults.image
    assert settings.nomad_driver == defaults.nomad_driver
    assert settings.nomad_datacenters == job["datacenters"] == defaults.nomad_datacenters
    assert (settings.min_containers, settings.max_containers, settings.slots) == (
        defaults.min_containers,
        defaults.max_containers,
        defaults.slots,
    )
    assert settings.nomad_namespace == job["namespace"]
    # Each executor of the group owns the pool named after its allocation index, which a
    # replacement allocation keeps.
    assert settings.job_id_per_alloc
    for index in range(3):
        monkeypatch.setenv("NOMAD_ALLOC_INDEX", str(index))
        in_alloc = ExecutorSettings(_env_file=None)
        assert in_alloc.pool_job_id == f"{JobFile(SANDBOX_JOB).job_id}-{index}"
        assert in_alloc.nomad().job_id == in_alloc.pool_job_id
        assert in_alloc.journal().identity == f"nomad-{in_alloc.pool_job_id}"
        # Pools of one node keep their slot uids apart (each sandbox adds its own index).
        uid_base = defaults.sandbox_slot_uid_base + index * defaults.max_containers * defaults.slots
        assert in_alloc.nomad().sandbox_env["ATROPOS_SANDBOX_SLOT_UID_BASE"] == str(uid_base)
    # The opt-out, for an executor that must keep adopting a pool registered under the plain id.
    monkeypatch.setenv("TOOL_EXECUTOR_JOB_ID_PER_ALLOC", "false")
    assert ExecutorSettings(_env_file=None).pool_job_id == JobFile(SANDBOX_JOB).job_id

    # Secrets come from the job's own Variable (readable through its workload identity).
    template = hcl.values(block(task, "template"))
    assert template["env"] is True
    assert template["destination"].startswith("secrets/")
    assert f'nomadVar "nomad/jobs/{hcl.job_id}"' in template["data"]
    rendered = set(re.findall(r"^\s*(?:\{\{.*\}\})?([A-Z_]+)=", template["data"], re.MULTILINE))
    assert {"NOMAD_TOKEN", "TOOL_EXECUTOR_TOKEN", "TOOL_EXECUTOR_TOOL_SERVER_TOKEN"} <= rendered


# ---- images


def dockerfile_stages() -> dict[str, str]:
    """Each ``FROM ... AS name`` stage's instructions (continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        start = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", stripped, re.IGNORECASE)
        if start:
            name = start.group(1)
            stages[name] = stripped + "\n"
        elif name is not None:
            stages[name] += stripped + "\n"
    return stages


def test_dockerfile_has_sandbox_and_executor_targets() -> None:
    stages = dockerfile_stages()
    sandbox, executor = stages["sandbox"], stages["executor"]
    assert re.search(r"apt-get install[^\n]*\bbubblewrap\b", sandbox)
    assert re.search(r"apt-get install[^\n]*\bprocps\b", sandbox)
    assert "bubblewrap" not in executor
    assert 'CMD ["python", "-m", "atropos_agent.sandbox"]' in sandbox
    assert 'CMD ["atropos-tool-executor", "serve"]' in executor
    assert "ENV ATROPOS_SANDBOX_HOST=0.0.0.0" in sandbox
    assert "ENV TOOL_EXECUTOR_HOST=0.0.0.0" in executor
    assert "EXPOSE 8080" in sandbox and "EXPOSE 9001" in executor
    # Slots get their own host uids, which takes root.
    assert "USER root" in sandbox
    # Every stage starts from the one Debian Python image.
    froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert froms[0] == "python:3.11-slim"
    assert set(froms[1:]) <= set(stages)
    # What the images run exists: the same entry points the other tests start directly.
    assert find_spec("atropos_agent.sandbox.__main__") is not None
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'atropos-tool-executor = "atropos_agent.cli:main"' in pyproject
    # The build context holds what pip needs.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"!pyproject.toml", "!README.md", "!atropos_agent/"} <= set(ignored)


# ---- deploy/


@pytest.mark.parametrize("script", DEPLOY_SCRIPTS, ids=lambda path: path.name)
def test_deploy_script_is_sound_bash(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    help_text = subprocess.run(
        ["bash", str(script), "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert help_text.startswith("Usage: deploy/")
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)


def test_run_nomad_keeps_tokens_out_of_arguments(tmp_path: Path) -> None:
    """Against a stand-in ``nomad`` CLI that records its arguments and the items it stores."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "nomad"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            echo "ARGS $*" >> {log}
            if [[ "$1 $2" == "var get" ]]; then exit 1; fi
            if [[ "$1 $2" == "var put" ]]; then
                for arg in "$@"; do
                    [[ "$arg" == *=@* ]] || continue
                    echo "ITEM ${{arg%%=*}}=$(cat "${{arg#*=@}}")" >> {log}
                done
            fi
            """
        )
    )
    fake.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "NOMAD_ADDR": "http://127.0.0.1:4646",
        "NOMAD_TOKEN": "operator-secret",
        "EXECUTOR_NOMAD_TOKEN": "executor-acl-secret",
        "TOOL_EXECUTOR_TOKEN": "trainer-secret",
        "NOMAD_NAMESPACE": "rl",
    }
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "run-nomad.sh"), "--var", "image=x:1"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    calls = log.read_text().splitlines()
    arguments = "\n".join(line for line in calls if line.startswith("ARGS "))
    assert "secret" not in arguments
    assert "ITEM nomad_token=executor-acl-secret" in calls
    assert "ITEM executor_token=trainer-secret" in calls
    assert not [line for line in calls if "tool_server_token" in line]
    put = next(line for line in calls if line.startswith("ARGS var put"))
    assert " nomad/jobs/atropos-tool-executor " in put and "-out=none" in put
    run = calls[-1]
    assert run.startswith("ARGS job run")
    assert "-var image=x:1" in run and "-var namespace=rl" in run
    assert run.endswith("nomad/tool-executor.nomad.hcl")


def setting_env_names() -> dict[str, str]:
    """Every setting's environment names, each mapped to the field it sets."""
    names: dict[str, str] = {}
    for field_name, field in ExecutorSettings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                names[str(choice)] = field_name
        else:
            names[f"TOOL_EXECUTOR_{field_name.upper()}"] = field_name
    return names


def test_example_env_lists_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "deploy" / "example.env").read_text()
    listed = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE))
    known = setting_env_names()
    assert not set(listed) - set(known), "example.env names settings that do not exist"
    covered = {known[name] for name in listed}
    assert covered == set(ExecutorSettings.model_fields), "settings missing from example.env"
    defaults = ExecutorSettings(_env_file=None)
    for name, value in listed.items():
        field = known[name]
        default = getattr(defaults, field)
        if default is None or not value:
            continue
        monkeypatch.setenv(name, value)
        shown = getattr(ExecutorSettings(_env_file=None), field)
        monkeypatch.delenv(name)
        assert shown == default, f"example.env shows {name}={value}, the default is {default!r}"
