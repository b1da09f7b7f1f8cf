"""The agent's life: read the config, take on the limits, answer frames until told to stop.

Started by the server as ``python -I -S <runtime dir> '<config json>'`` (``sandbox/runtime.py``
lays the directory out; its ``__main__.py`` calls ``main()``). The agent's stdin and stdout are
the pipe to the server; commands never see them.

A ``cancel`` frame is read where it can act, in the loop that supervises a running command
(``processes.Runner``); one read here found the agent idle, too late for the call it meant,
and gets no answer, so that answers stay in step with requests.

Once the slot has background jobs, the idle wait for the next request reads their output and
fires their timeouts (``jobs.Jobs.wait_for_request``).
"""

from __future__ import annotations

import json
import os
import sys

from .artifacts import ARTIFACTS
from .config import AgentConfig, apply_limits
from .framing import (
    OP_CANCEL,
    OP_EXTRACT,
    OP_SHUTDOWN,
    OP_TOOL,
    OP_WORKSPACE,
    ChannelError,
    StopRequested,
    read_frame,
    write_frame,
)
from .processes import Runner
from .results import ToolError, cancelled, failure
from .shell import StatefulShell
from .streaming import OutputStream
from .tools import TOOLS
from .workspace import Workspace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .jobs import Jobs
    from .repl import StatefulPython
    from .tmux import Tmux


class Agent:
    """One slot's agent: its config, its workspace, how it runs commands, its stateful shell."""

    def __init__(self, config: AgentConfig, child_exited_r: int = -1, requests_r: int = -1) -> None:
        self.config = config
        self.workspace = Workspace(
            config.root,
            config.scratch,
            config.disk_bytes,
            config.disk_root,
            config.disk_baseline_bytes,
        )
        self.runner = Runner(config, self.workspace, child_exited_r, requests_r)
        self.shell = StatefulShell(self.runner)
        # The tmux session's keeper, made on the first tmux call (agent/tmux.py).
        self.tmux: Tmux | None = None
        # The background jobs' keeper, made on the first job (agent/jobs.py).
        self.jobs: Jobs | None = None
        # The persistent Python interpreter's keeper, made on first use (agent/repl.py).
        self.python_repl: StatefulPython | None = None
        # The channel to the server, for a streamed call's output frames (-1: none).
        self.channel_out = -1

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request; marked cancelled when the server cancelled it meanwhile."""
        self.runner.cancelled = False
        if request.get("stream") and self.channel_out >= 0:
            self.runner.stream = OutputStream(self.channel_out)
        try:
            answer = self.answer(request)
        finally:
            self.runner.stream = None
        return cancelled(answer) if self.runner.cancelled else answer

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request; a ``ToolError`` becomes a failure with its message."""
        op = request.get("op")
        try:
            if op == OP_TOOL:
                tool = TOOLS.get(request.get("tool", ""))
                if tool is None:
                    return failure(f"unknown tool {request.get('tool')!r}")
                args = request.get("args") or {}
                if not isinstance(args, dict):
                    return failure("tool arguments must be a JSON object")
                return tool(self, args, float(request.get("timeout", 30.0)))
            artifact = ARTIFACTS.get(str(op))
            if artifact is not None:
                return artifact(self.workspace, self.config.max_file_bytes, request)
            if op == OP_WORKSPACE:
                return self.workspace.enter(request)
            if op == OP_EXTRACT:
                from .extract import extract  # on first use: an idle slot does not carry it

                return extract(self.workspace, request)
            return failure(f"unknown agent operation {op!r}")
        except ToolError as exc:
            return failure(str(exc))
        except (ChannelError, StopRequested):
            raise  # no answer is wanted, or none could be matched to its request any more
        except Exception as exc:  # the agent must answer every request, whatever went wrong
            return failure(f"internal error in the slot agent: {exc!r}")


def main(argv: list[str] | None = None) -> None:
    config = AgentConfig(json.loads((argv or sys.argv)[1]))
    # The pipe to the server moves to private descriptors; 0 and 1 become /dev/null so that
    # nothing the agent starts can read or write it by accident.
    channel_in, channel_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.chdir(config.root)
    agent = Agent(config, apply_limits(config), channel_in)
    agent.channel_out = channel_out
    write_frame(channel_out, {"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
    try:
        serve(agent, channel_in, channel_out)
    except StopRequested:
        pass  # the server stops, mid-call: as below
    except (ChannelError, ValueError) as exc:
        agent.runner.kill_tree(os.getpid(), 0)
        raise SystemExit(f"agent: {exc}") from None
    # Whether asked to stop or abandoned by the server, leave no process of the slot behind.
    agent.runner.kill_tree(os.getpid(), 0)


def serve(agent: Agent, channel_in: int, channel_out: int) -> None:
    """Answer requests until the server says stop or closes the channel."""
    while True:
        if agent.jobs is not None:
            agent.jobs.wait_for_request(channel_in)  # reading the jobs' output meanwhile
        request = read_frame(channel_in)
        if request is None or request.get("op") == OP_SHUTDOWN:
            return
        if request.get("op") == OP_CANCEL:
            continue  # the call it meant has already been answered
        write_frame(channel_out, agent.handle(request))
