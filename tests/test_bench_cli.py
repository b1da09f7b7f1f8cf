"""``atropos-tool-executor bench`` and ``status`` as people run them: the real command against
a real executor (and sandbox servers) started by the fixtures, or one the bench starts itself.

The bench's JSON is checked against the field table of docs/benchmarks.md ("The bench's
JSON"): every field it writes is documented there, and every documented field is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.servers import TOKEN, ExecutorServer, SandboxServer, temporary_dir

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
FULL_MIX = "shell=2,python=1,files=1,archive=1"
LABELS = {"shell", "python", "write_file", "read_file", "archive"}


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Any:
    """``python -m atropos_agent.cli ARGS`` with wide tables; the finished process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("TOOL_EXECUTOR_TOKEN", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "atropos_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def documented_fields() -> list[str]:
    """The field paths of the doc's table, shorthand (``.p95`` after ``a.b.p50``) expanded."""
    section = DOC.read_text().split("### The bench's JSON", 1)[1].split("\n## ", 1)[0]
    fields = []
    for row in re.findall(r"^\| (`[^|]*) \|", section, re.MULTILINE):
        prefix = ""
        for name in re.findall(r"`([^`]+)`", row):
            if name.startswith("."):
                name = prefix + name
            prefix = name.rsplit(".", 1)[0]
            fields.append(name)
    return fields


def pattern_of(field: str) -> re.Pattern[str]:
    """``<name>`` in a documented field stands for any one key."""
    parts = re.split(r"(<[a-z]+>)", field)
    return re.compile("".join(r"[^.\[]+" if p.startswith("<") else re.escape(p) for p in parts))


def prefixes(path: str) -> list[str]:
    segments = path.split(".")
    return [".".join(segments[: n + 1]) for n in range(len(segments))]


def leaves(value: Any, path: str = "") -> Iterator[str]:
    """Every field path of a JSON value; an empty object or null is a leaf of its own."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value:
        for item in value:
            yield from leaves(item, f"{path}[]")
    else:
        yield path


def check_documented(report: dict[str, Any]) -> None:
    fields = documented_fields()
    written = set(leaves(report))
    for path in written:
        # A field of the table, or a null (or empty) object whose fields are in the table.
        assert any(
            pattern_of(prefix).fullmatch(path) for field in fields for prefix in prefixes(field)
        ), f"{path} is written but not documented in {DOC.name}"
    for field in fields:
        if "<kind>" in field:
            continue  # maps of error kinds are empty in a clean run
        pattern = pattern_of(field)
        assert any(
            # The field or one of its own, or a null object above it.
            any(pattern.fullmatch(prefix) for prefix in prefixes(path))
            or any(pattern_of(prefix).fullmatch(path) for prefix in prefixes(field))
            for path in written
        ), f"{field} is documented but not written"


def check_level(level: dict[str, Any], labels: set[str]) -> None:
    for path in ("executor", "sandbox"):
        phase = level[path]
        assert phase["calls"] > 0 and phase["errors"] == 0, phase
        assert phase["errors_by_kind"] == {}
        assert set(phase["tools"]) == labels
        assert sum(t["calls"] for t in phase["tools"].values()) == phase["calls"]
        latency = phase["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert phase["calls_per_s"] == pytest.approx(phase["calls"] / phase["elapsed_s"], rel=0.01)
    ratios = level["ratios"]
    assert ratios["executor_to_sandbox"] == pytest.approx(
        level["executor"]["calls_per_s"] / level["sandbox"]["calls_per_s"], abs=0.001
    )


def test_bench_against_a_running_executor_writes_the_documented_json(
    executor: ExecutorServer, sandbox_factory: Callable[..., SandboxServer], tmp_path: Path
) -> None:
    direct = sandbox_factory(slots=4)
    out = tmp_path / "bench.json"
    done = run_cli(
        *("bench", "--url", executor.url, "--concurrency", "1,4", "--duration", "1"),
        *("--mix", FULL_MIX, "--sandbox-url", direct.url, "--json", str(out)),
        env={"TOOL_EXECUTOR_TOKEN": TOKEN, "ATROPOS_SANDBOX_TOKEN": TOKEN},
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(out.read_text())
    check_documented(report)
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    assert report["mix"] == {"shell": 2, "python": 1, "files": 1, "archive": 1}
    assert report["service"]["started_by_bench"] is False
    assert report["service"]["sandbox_baseline"] == {"servers": 1, "slots": 4}
    for level in report["levels"]:
        check_level(level, LABELS)
        spawn = level["spawn_loop"]
        assert spawn["workers"] == os.cpu_count() and spawn["calls"] > 0 and spawn["errors"] == 0
        shell = level["executor"]["tools"]["shell"]["calls_per_s"]
        assert level["ratios"]["trivial_to_spawn_loop"] == pytest.approx(
            shell / spawn["calls_per_s"], abs=0.001
        )
    # The tables a person reads, every label and both paths in them.
    for text in ("executor", "sandbox", "spawn loop", "No call failed", *LABELS):
        assert text in done.stdout, done.stdout
    # Every trajectory of the bench was released.
    assert executor.status()["leases"] == 0


def test_bench_counts_failed_calls_by_error_kind(executor: ExecutorServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_cli(
        *("bench", "--url", executor.url, "--token", "not-the-token", "--concurrency", "2"),
        *("--calls", "3", "--no-spawn-loop", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    level = json.loads(out.read_text())["levels"][0]
    # 2 first calls and 2 x 3 timed calls, every one refused.
    assert level["executor"]["calls"] == 6
    assert level["executor"]["errors_by_kind"] == {"http_403": 8}
    assert level["sandbox"] is None and level["spawn_loop"] is None
    assert level["ratios"] == {"executor_to_sandbox": None, "trivial_to_spawn_loop": None}
    assert "http_403" in done.stdout
    assert "not-the-token" not in out.read_text()  # the command is shown without secrets


def test_bench_starts_its_own_service_and_plots(tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    # The bench's temporary directories go here (slots' uids must traverse it).
    with temporary_dir() as temp:
        done = run_cli(
            *("bench", "--concurrency", "1,2", "--duration", "1", "--mix", "shell,files"),
            *("--no-spawn-loop", "--json", str(out), "--plot", str(plot)),
            env={"TMPDIR": str(temp)},
        )
        left = list(temp.iterdir())
        running = [p for p in Path("/proc").glob("[0-9]*") if str(temp) in cmdline(p)]
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(out.read_text())
    service = report["service"]
    assert service["started_by_bench"] is True and service["start_s"] > 0
    assert (service["sandboxes"], service["slots_per_sandbox"]) == (1, 2)
    assert service["sandbox_baseline"] == {"servers": 1, "slots": 2}
    for level in report["levels"]:
        check_level(level, {"shell", "write_file", "read_file"})
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The service, its sandboxes and the baseline's are gone, and so are their directories.
    assert left == [] and running == []


def cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_bench_refuses_an_unknown_mix_entry() -> None:
    done = run_cli("bench", "--mix", "shell,nope", timeout=30)
    assert done.returncode == 2
    assert "unknown mix entry 'nope'" in done.stderr


def test_status_shows_the_pool_and_the_latest_errors(executor: ExecutorServer) -> None:
    assert executor.sh("status-ok", "echo hi")["success"]
    assert not executor.sh("status-failing", "exit 3")["success"]
    done = run_cli("status", "--url", executor.url, "--token", TOKEN, timeout=30)
    assert done.returncode == 0, done.stderr
    status = executor.status()
    pool = status["pool"]
    sandbox = pool["per_sandbox"][0]["sandbox_id"]
    assert f"{pool['total_slots']} ({pool['slots_per_sandbox']} each)" in done.stdout
    assert sandbox in done.stdout
    # The failed call, by kind and in the latest ones, as /status has it.
    assert status["errors"]["by_kind"]["tool_failed"] >= 1
    latest = status["errors"]["latest"][-1]
    assert latest["trajectory_id"] == "status-failing" and latest["error_kind"] == "tool_failed"
    assert "status-failing" in done.stdout and "tool_failed" in done.stdout
    for name in ("available", "acquired", "waiting for a slot", "p50"):
        assert name in done.stdout


def test_status_watch_refreshes_and_ends(executor: ExecutorServer) -> None:
    done = run_cli(
        *("status", "--url", executor.url, "--token", TOKEN, "--watch", "0.2"),
        *("--iterations", "3"),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "Sandboxes" in done.stdout


def test_status_names_the_refusal(executor: ExecutorServer) -> None:
    done = run_cli("status", "--url", executor.url, "--token", "wrong", timeout=30)
    assert done.returncode == 1
    assert "invalid bearer token" in done.stderr
