"""The tools a call can name: each checks its arguments, then works through the agent's parts.

The server fails an item naming an unknown tool before it reaches a slot (``sandbox/tools.py``
lists the names with their schemas); this table is what the agent actually does for each.
"""

from __future__ import annotations

from .results import ToolError, failure

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .main import Agent

    Tool = Callable[[Agent, dict[str, Any], float], dict[str, Any]]


def command_argument(args: dict[str, Any]) -> str:
    """The command to run; an empty one runs (and succeeds), as in the old service."""
    command = args.get("command")
    if not isinstance(command, str):
        raise ToolError("'command' must be a string")
    if "\x00" in command:
        # No argv or shell script can hold one: say so rather than fail in posix_spawn.
        raise ToolError("'command' must not contain NUL characters")
    return command


def terminal(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = command_argument(args)
    if args.get("background"):
        from .jobs import background_run  # on first use: an idle slot does not carry it

        return background_run(agent, args, timeout)
    return agent.runner.run([agent.config.shell, "-c", command], timeout)


def terminal_stateful(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        return agent.shell.run(command_argument(args), timeout)
    except ToolError as exc:
        return failure(str(exc), stateful=True)


def python(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    code = args.get("code", args.get("source"))
    if not isinstance(code, str):
        raise ToolError("'code' must be a string of Python source")
    if "\x00" in code:
        raise ToolError("'code' must not contain NUL characters")
    return agent.runner.run([agent.config.python, "-"], timeout, stdin_data=code.encode())


def read_file(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    workspace = agent.workspace
    real = workspace.resolve(args.get("path"))
    data, size, truncated = workspace.read_bytes(real, agent.config.max_file_bytes)
    return {
        "success": True,
        "output": data.decode("utf-8", "replace"),
        "error": "",
        "metadata": {
            "path": workspace.relative(real),
            "size": size,  # the old service's name: the file's size
            "bytes": len(data),
            "file_size": size,
            "truncated": truncated,
        },
    }


def write_file(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    # No content writes an empty file, as in the old service.
    content = args.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ToolError("'content' must be a string")
    data = content.encode()
    limit = agent.config.max_file_bytes
    if len(data) > limit:
        raise ToolError(f"content of {len(data)} bytes exceeds the {limit}-byte file write limit")
    workspace = agent.workspace
    real = workspace.resolve(args.get("path"), for_write=True)
    workspace.write_bytes(real, data)
    name = workspace.relative(real)
    return {
        "success": True,
        "output": f"Successfully wrote {len(data)} bytes to {name}",
        "error": "",
        "metadata": {"path": name, "size": len(data), "bytes": len(data)},
    }


def edit_file(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    # The old service's argument names are accepted too.
    old = args.get("old_string", args.get("old_str"))
    new = args.get("new_string", args.get("new_str"))
    if not isinstance(old, str) or not old:
        raise ToolError("'old_string' must be a non-empty string")
    if not isinstance(new, str):
        raise ToolError("'new_string' must be a string")
    workspace = agent.workspace
    limit = agent.config.max_file_bytes
    real = workspace.resolve(args.get("path"))
    name = workspace.relative(real)
    data, _, truncated = workspace.read_bytes(real, limit)
    if truncated:
        raise ToolError(f"file is larger than the {limit}-byte edit limit")
    # surrogateescape: bytes that are not UTF-8 are written back exactly as they were.
    text = data.decode("utf-8", "surrogateescape")
    count = text.count(old)
    if count == 0:
        raise ToolError(f"'old_string' was not found in {name}")
    if count > 1:
        raise ToolError(
            f"'old_string' occurs {count} times in {name}; "
            "include more context so that it is unique"
        )
    updated = text.replace(old, new, 1).encode("utf-8", "surrogateescape")
    if len(updated) > limit:
        raise ToolError(f"edited file would exceed the {limit}-byte limit")
    workspace.write_bytes(real, updated)
    return {
        "success": True,
        "output": f"edited {name}",
        "error": "",
        "metadata": {"path": name, "bytes": len(updated)},
    }


def tmux(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    from .tmux import tmux as run  # on first use: an idle slot does not carry it

    return run(agent, args, timeout)


def python_stateful(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    from .repl import python_stateful as run  # on first use: an idle slot does not carry it

    return run(agent, args, timeout)


def background_tool(name: str) -> Tool:
    """The background-job tool ``name`` (``jobs.py``, imported on first use)."""

    def call(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        from .jobs import TOOLS as JOB_TOOLS

        return JOB_TOOLS[name](agent, args, timeout)

    return call


TOOLS: dict[str, Tool] = {
    "terminal": terminal,
    "bash": terminal,  # the old service's name for it
    "terminal_stateful": terminal_stateful,
    "bash_stateful": terminal_stateful,  # the old executor's name for it
    "read_file": read_file,
    "write_file": write_file,
    "edit_file": edit_file,
    "python": python,
    "python_stateful": python_stateful,
    "tmux": tmux,
    "background_run": background_tool("background_run"),
    "check_background": background_tool("check_background"),
    "background_kill": background_tool("background_kill"),
}
