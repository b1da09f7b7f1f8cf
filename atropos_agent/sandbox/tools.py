"""The sandbox tools and their JSON schemas (OpenAI function style), as served by ``GET /tools``."""

from __future__ import annotations

from typing import Any

PATH_PROPERTY = {
    "type": "string",
    "description": "Path relative to the workspace (/workspace/... is accepted too).",
}
TIMEOUT_PROPERTY = {
    "type": "number",
    "description": "Seconds the command may run (1..600, default 30).",
}


def function(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


SANDBOX_TOOL_SCHEMAS: list[dict[str, Any]] = [
    function(
        "terminal",
        "Run a shell command (bash) in the trajectory's workspace, /workspace. Output is stdout "
        "and stderr merged; each call starts a fresh shell.",
        {"command": {"type": "string"}, "timeout": TIMEOUT_PROPERTY},
        ["command"],
    ),
    function(
        "terminal_stateful",
        "Run a command in the trajectory's persistent shell: the working directory, variables "
        "and functions survive between calls.",
        {"command": {"type": "string"}, "timeout": TIMEOUT_PROPERTY},
        ["command"],
    ),
    function(
        "read_file",
        "Read a text file from the workspace.",
        {"path": PATH_PROPERTY},
        ["path"],
    ),
    function(
        "write_file",
        "Create or overwrite a file in the workspace (parent directories are created).",
        {"path": PATH_PROPERTY, "content": {"type": "string"}},
        ["path", "content"],
    ),
    function(
        "edit_file",
        "Replace one exact, unique occurrence of old_string with new_string in a file.",
        {
            "path": PATH_PROPERTY,
            "old_string": {"type": "string"},
            "new_string": {"type": "string"},
        },
        ["path", "old_string", "new_string"],
    ),
    function(
        "python",
        "Run a Python snippet with the sandbox's python3 in the workspace.",
        {"code": {"type": "string"}, "timeout": TIMEOUT_PROPERTY},
        ["code"],
    ),
]

# Names a sandbox accepts: the schemas above plus the old service's alias for `terminal`.
SANDBOX_TOOLS = frozenset(
    [schema["function"]["name"] for schema in SANDBOX_TOOL_SCHEMAS] + ["bash"]
)
