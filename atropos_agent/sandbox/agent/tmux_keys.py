"""What a ``tmux`` call's arguments mean: keys (key names or text to type), the marker that
lets a blocking ``send_keys`` wait for its command, tmux ``send-keys`` commands of a bounded
size, and the flags and numbers the actions take."""

from __future__ import annotations

from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Keys of one call, in all; longer text belongs in a file (write_file).
MAX_KEYS_BYTES = 256 * 1024
# tmux refuses a command larger than 16 KiB: keys are sent in groups below that.
KEYS_GROUP_BYTES = 8 * 1024
# Keys that end a command line. Matched case-insensitively, like tmux's key names.
ENTER_KEYS = frozenset({"enter", "c-m", "^m", "kpenter", "c-j", "^j"})
# tmux key names (besides single characters and C-/M-/S- modified ones), lower-cased.
NAMED_KEYS = frozenset(
    {
        *("enter", "escape", "tab", "btab", "bspace", "space", "any"),
        *("up", "down", "left", "right", "home", "end", "insert", "ic", "delete", "dc"),
        *("pageup", "pgup", "ppage", "pagedown", "pgdn", "npage"),
        *(f"f{n}" for n in range(1, 13)),
        *("kp/", "kp*", "kp-", "kp+", "kp.", "kpenter", *(f"kp{n}" for n in range(10))),
    }
)


def is_key_name(key: str) -> bool:
    """Whether tmux ``send-keys`` takes ``key`` as a key name rather than as text."""
    if len(key) == 2 and key[0] == "^":
        return True
    rest = key
    while len(rest) > 2 and rest[1] == "-" and rest[0] in "CMScms":
        rest = rest[2:]
    return (rest != key and len(rest) == 1) or rest.lower() in NAMED_KEYS


def keys_argument(args: dict[str, Any]) -> list[str]:
    keys = args.get("keys")
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ToolError(
            "'keys' must be a string or a list of strings: tmux key names such as 'Enter', "
            f"'C-c', 'Up', or text to type (got {type(args.get('keys')).__name__})"
        )
    if any("\x00" in key for key in keys):
        raise ToolError("'keys' must not contain NUL bytes")
    size = sum(len(key.encode()) for key in keys)
    if size > MAX_KEYS_BYTES:
        raise ToolError(
            f"'keys' of {size} bytes exceed the {MAX_KEYS_BYTES}-byte limit of one call; "
            "write long text to a file with write_file instead"
        )
    return [key for key in keys if key]


def with_wait_marker(keys: list[str], channel: str) -> list[str]:
    """``keys`` as one command line that signals ``channel`` once it finished, then Enter."""
    keys = list(keys)
    while keys:
        last = keys[-1]
        if last.lower() in ENTER_KEYS:
            keys.pop()
        elif not is_key_name(last) and last.rstrip("\r\n") != last:
            if last.rstrip("\r\n"):
                keys[-1] = last.rstrip("\r\n")
            else:
                keys.pop()
        else:
            break
    marker = f"tmux wait -S {channel}"
    if keys and (not is_key_name(keys[-1]) or keys[-1].lower() == "space"):
        line = keys[-1].rsplit("\n", 1)[-1].rstrip()
        if keys[-1].lower() == "space":
            marker = "; " + marker
        elif line.endswith((";", "&", "|")):
            marker = " " + marker
        elif line:
            marker = "; " + marker
    elif keys and not keys[-1].startswith(("C-", "c-", "^")):
        # After a key such as Up (history) or Tab (completion) the line holds a command.
        marker = "; " + marker
    return [*keys, marker, "Enter"]


def send_commands(keys: list[str], session: str) -> list[list[str]]:
    """``send-keys`` commands for ``keys``, each below tmux's command size limit."""
    commands: list[list[str]] = []
    group: list[str] = []
    size = 0
    for key in keys:
        length = len(key.encode())
        if length > KEYS_GROUP_BYTES:
            # Long text goes literally, in pieces of at most 4 bytes per character.
            step = KEYS_GROUP_BYTES // 4
            pieces = [key[i : i + step] for i in range(0, len(key), step)]
            if group:
                commands.append(["send-keys", "-t", session, "--", *group])
                group, size = [], 0
            commands += [["send-keys", "-l", "-t", session, "--", piece] for piece in pieces]
            continue
        if group and size + length > KEYS_GROUP_BYTES:
            commands.append(["send-keys", "-t", session, "--", *group])
            group, size = [], 0
        group.append(key)
        size += length
    if group:
        commands.append(["send-keys", "-t", session, "--", *group])
    return commands


def flag(args: dict[str, Any], name: str) -> bool:
    value = args.get(name)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value is True or (isinstance(value, int) and value == 1)


def seconds(args: dict[str, Any], name: str, default: float) -> float:
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ToolError(f"'{name}' must be a number of seconds >= 0")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float (10**400): longer than any wait
        return float("inf")


def integer(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ToolError(f"'{name}' must be an integer from {low} to {high}")
    return value
