"""The layering contract (pyproject's ``[tool.importlinter]``, run by ``make lint``) holds for the
tree as it is, and fails for a copy in which a lower layer imports an upper one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_its_layers() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "upper"),
    [
        ("executor/batcher.py", "atropos_agent.executor.pool"),
        ("executor/sandbox_client.py", "atropos_agent.executor.backends.local"),
        ("sandbox/protocol.py", "atropos_agent.executor.settings"),
        ("models.py", "atropos_agent.client"),
        ("client/transport.py", "atropos_agent.client.routing"),
        ("sandbox/slot.py", "atropos_agent.sandbox.server"),
        ("sandbox/agent/framing.py", "pydantic"),
    ],
)
def test_an_import_up_the_layers_breaks_the_contract(
    tmp_path: Path, module: str, upper: str
) -> None:
    shutil.copytree(ROOT / "atropos_agent", tmp_path / "atropos_agent")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "atropos_agent" / module, "a") as source:
        source.write(f"\nimport {upper}  # noqa: E402\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    importer = "atropos_agent." + module.removesuffix(".py").replace("/", ".")
    assert re.search(rf"-\s+{re.escape(importer)} -> {re.escape(upper)}", done.stdout), done.stdout
