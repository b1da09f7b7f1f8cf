"""Shared helpers: JSON type, errors, time, ids and Go-style formatting."""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

Json = dict[str, Any]

NS_PER_S = 1_000_000_000


class NomadError(Exception):
    """An error answered as Nomad does: a status code and a plain-text body."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def now_ns() -> int:
    return time.time_ns()


def new_id() -> str:
    return str(uuid.uuid4())


def deep_copy(value: Any) -> Any:
    return copy.deepcopy(value)


def rfc3339(ns: int | None) -> str:
    """Go's time.Time JSON form; the zero time when unset."""
    if not ns:
        return "0001-01-01T00:00:00Z"
    seconds, frac = divmod(ns, NS_PER_S)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{frac:09d}Z"


def go_duration(ns: int) -> str:
    """Format nanoseconds like Go's time.Duration.String ("15s", "30m0s", "1.5s")."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < NS_PER_S:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * NS_PER_S)
    minutes, rest = divmod(rest, 60 * NS_PER_S)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{_trim(rest / NS_PER_S)}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": NS_PER_S}
_UNIT_NS.update({"m": 60 * NS_PER_S, "h": 3600 * NS_PER_S})


def parse_go_duration(text: str) -> int:
    """Parse Go's duration syntax ("10s", "5m", "1m30s") into nanoseconds."""
    text = text.strip()
    if text in ("0", ""):
        return 0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_NS[match.group(2)]
        pos = match.end()
    return int(total)


def multierror(errors: list[str]) -> str:
    """Text of hashicorp/go-multierror's default format, as Nomad's error bodies show it."""
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t".join(f"* {error}" for error in errors)
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


def as_int(value: Any, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def get_dict(source: Mapping[str, Any], key: str) -> Json:
    value = source.get(key)
    return value if isinstance(value, dict) else {}


def get_list(source: Mapping[str, Any], key: str) -> list[Any]:
    value = source.get(key)
    return value if isinstance(value, list) else []
