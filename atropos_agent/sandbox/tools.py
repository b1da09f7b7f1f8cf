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
        "Run a shell command (bash) in the trajectory's workspace, /workspace. Output is stdout, "
        "then '[stderr]' and stderr; each call starts a fresh shell. With background: true it "
        "starts a background job instead, as background_run does.",
        {
            "command": {"type": "string"},
            "timeout": TIMEOUT_PROPERTY,
            "background": {
                "type": "boolean",
                "description": "Start the command as a background job and answer at once with "
                "its task_id (default false); timeout is then the job's.",
            },
        },
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
    function(
        "python_stateful",
        "Run Python code in the trajectory's persistent interpreter (the sandbox's python3, in "
        "/workspace): variables, imports and definitions survive between calls. Output is "
        "stdout, then '[stderr]' and stderr; the value of a final expression is printed as a "
        "REPL prints it (and is metadata.value). An exception's traceback is the error, and "
        "the state is kept. A timeout stops the interpreter: its state is lost and the next "
        "call starts a new one. reset: true starts a new interpreter (then runs code, if any).",
        {
            "code": {"type": "string", "description": "Python source; required unless reset."},
            "reset": {
                "type": "boolean",
                "description": "Start a new interpreter first, discarding all state "
                "(default false).",
            },
            "timeout": TIMEOUT_PROPERTY,
        },
        [],
    ),
    function(
        "tmux",
        "An interactive terminal (one tmux session per trajectory) for full-screen and "
        "interactive programs. action 'start' opens it (pane_width x pane_height, default "
        "200x50; a running session is kept); 'send_keys' types keys (text, or tmux key names "
        "such as Enter, C-c, Up, Escape); with block: true the keys are run as one command "
        "line and the call waits until it finished (up to max_wait_s); 'capture' returns the "
        "screen (capture_entire: true for the whole scroll-back); 'stream' returns the "
        "asciinema v2 recording's lines written since the last stream (reset: true from the "
        "start; max_bytes); 'stop' ends the session. An unknown action captures.",
        {
            "action": {
                "type": "string",
                "enum": ["start", "send_keys", "capture", "stream", "stop"],
                "description": "What to do; anything else is taken as 'capture'.",
            },
            "keys": {
                "description": "send_keys: text to type, or tmux key names (Enter, C-c, Up, "
                "Escape, ...), one string or a list sent in order.",
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                ],
            },
            "block": {
                "type": "boolean",
                "description": "send_keys: append a completion marker and Enter, and wait "
                "until the command line finished at the shell prompt (default false).",
            },
            "max_wait_s": {
                "type": "number",
                "description": "send_keys with block: longest wait in seconds (default and "
                "upper bound: the call's timeout).",
            },
            "min_wait_s": {
                "type": "number",
                "description": "send_keys without block: seconds to wait after sending "
                "(default 0).",
            },
            "capture_entire": {
                "type": "boolean",
                "description": "capture: the whole scroll-back, not only the visible screen.",
            },
            "pane_width": {"type": "integer", "description": "start: columns (default 200)."},
            "pane_height": {"type": "integer", "description": "start: rows (default 50)."},
            "reset": {
                "type": "boolean",
                "description": "stream: start again from the recording's first line.",
            },
            "max_bytes": {
                "type": "integer",
                "description": "stream: most bytes of whole lines returned (default: the "
                "output cap).",
            },
            "timeout": TIMEOUT_PROPERTY,
        },
        ["action"],
    ),
    function(
        "background_run",
        "Start a shell command as a background job in the trajectory's workspace and answer at "
        "once with its task_id (metadata.task_id). stdout and stderr are merged and kept (the "
        "first and the last 512 KiB); poll with check_background. A slot runs at most 16 jobs "
        "at once; a reset of the workspace ends them all.",
        {
            "command": {"type": "string"},
            "timeout": {
                "type": "number",
                "description": "Seconds the job may run before it is killed (default and most: "
                "the sandbox's job timeout, 300 unless set otherwise).",
            },
        },
        ["command"],
    ),
    function(
        "check_background",
        "A background job's status (running, exited with exit_code, timed_out, killed) and "
        "its output from byte offset since on; metadata.next is the offset to poll from next, "
        "so each byte comes once (dropped_bytes says how many fell out of the bounded buffer "
        "before since). Without task_id: every job of the trajectory (id, command, status, "
        "runtime).",
        {
            "task_id": {"type": "string"},
            "since": {
                "type": "integer",
                "minimum": 0,
                "description": "Byte offset into the job's output (default 0): the last "
                "answer's metadata.next.",
            },
        },
        [],
    ),
    function(
        "background_kill",
        "Kill a background job: its process and everything it started.",
        {"task_id": {"type": "string"}},
        ["task_id"],
    ),
]

# Names a sandbox accepts: the schemas above plus the old service's aliases, `bash` for
# `terminal` and `bash_stateful` for `terminal_stateful` (the old executor's batch items).
SANDBOX_TOOLS = frozenset(
    [schema["function"]["name"] for schema in SANDBOX_TOOL_SCHEMAS] + ["bash", "bash_stateful"]
)
