"""How the slot agent reaches a slot: a runtime directory the server lays out at start-up.

    data_dir/runtime/        bound read-only at /run/atropos inside every slot
        __main__.py          the entry: ``python -I -S <runtime dir> '<config json>'`` runs it
        agent/               a copy of ``atropos_agent/sandbox/agent``, compiled in place

Why a copy, and why run a directory: the agent runs under the sandbox's own python3 and each
slot's uid, which may not reach the server's virtualenv; a slot sees the agent package and
nothing else of the server; and an upgrade of the installed package never changes the code of
a running slot. ``-I`` (isolated: no environment variables, no user site, no script directory
on ``sys.path``) still puts a directory named as the program on ``sys.path``, which is what
makes ``agent`` importable there. The copy is compiled once by the slot's python3, so that no
slot compiles it again (the directory is read-only to slots, and a slot's idle memory would
carry what compiling left behind).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from atropos_agent.errors import SandboxStartError
from atropos_agent.sandbox import agent

ENTRY = '''"""Entry of the slot agent: ``python -I -S <this directory> '<config json>'``."""

from agent.main import main

main()
'''


def install_runtime(runtime_dir: Path, python: str) -> None:
    """Lay out ``runtime_dir`` afresh, readable by every uid; raises when ``python`` cannot
    compile the agent (too old, or not a python)."""
    if runtime_dir.exists():
        shutil.rmtree(runtime_dir)
    package = Path(agent.__file__).parent
    shutil.copytree(
        package,
        runtime_dir / "agent",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        copy_function=shutil.copyfile,
    )
    (runtime_dir / "__main__.py").write_text(ENTRY)
    done = subprocess.run(
        [python, "-I", "-S", "-m", "compileall", "-q", str(runtime_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={},
    )
    if done.returncode != 0:
        raise SandboxStartError(
            f"{python} cannot compile the slot agent ({done.stdout.strip()} "
            f"{done.stderr.strip()}): the sandbox needs python3 >= 3.10; set "
            "ATROPOS_SANDBOX_PYTHON to one"
        )
    for path in [runtime_dir, *runtime_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
