"""Rendering of task ``template`` blocks: the Nomad-variable subset of consul-template.

https://developer.hashicorp.com/nomad/docs/job-specification/template#nomad-variables

Supported actions: ``{{ with nomadVar "path" }} ... {{ end }}`` (``path@namespace`` too),
``{{ .key }}`` / ``{{ .key.Value }}`` inside such a block, ``{{ env "NAME" }}`` and
``{{/* comments */}}``, with Go's ``{{-``/``-}}`` whitespace trimming. A key missing from a
variable renders ``<no value>`` as Go templates do. Anything else is a render error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Looks a variable up; returns its items, or None when it is missing or not readable.
Lookup = Callable[[str, str], Mapping[str, str] | None]

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_WITH = re.compile(r'^with\s+nomadVar\s+"([^"]+)"$')
_ENV = re.compile(r'^env\s+"([^"]+)"$')
_FIELD = re.compile(r"^\.([A-Za-z0-9_\-]+)(\.Value)?$")


class TemplateError(Exception):
    pass


@dataclass
class Rendered:
    text: str
    # (namespace, path) of every nomadVar the template asked for
    paths: set[tuple[str, str]] = field(default_factory=set)
    # paths that were missing or not readable by this task
    missing: list[str] = field(default_factory=list)


def render(source: str, namespace: str, lookup: Lookup, env: Mapping[str, str]) -> Rendered:
    pieces = _split(source)
    out: list[str] = []
    result = Rendered("")
    # Each frame: (active, items) where items is the variable of the innermost `with`.
    stack: list[tuple[bool, Mapping[str, str] | None]] = [(True, None)]
    for kind, value in pieces:
        active, items = stack[-1]
        if kind == "text":
            if active:
                out.append(value)
            continue
        action = value.strip()
        if action.startswith("/*") and action.endswith("*/"):
            continue
        with_match = _WITH.match(action)
        if with_match:
            path, _, ns = with_match.group(1).partition("@")
            ns = ns.split(".", 1)[0] or namespace
            found = lookup(ns, path) if active else None
            if active:
                result.paths.add((ns, path))
                if found is None:
                    result.missing.append(f"{path}@{ns}")
            stack.append((active and found is not None, found))
            continue
        if action == "end":
            if len(stack) == 1:
                raise TemplateError("unexpected {{end}}")
            stack.pop()
            continue
        if not active:
            continue
        env_match = _ENV.match(action)
        if env_match:
            out.append(env.get(env_match.group(1), ""))
            continue
        field_match = _FIELD.match(action)
        if field_match and items is not None:
            out.append(items.get(field_match.group(1), "<no value>"))
            continue
        raise TemplateError(f"unsupported template action {{{{ {action} }}}}")
    if len(stack) != 1:
        raise TemplateError("unexpected EOF: missing {{end}}")
    result.text = "".join(out)
    return result


def _split(source: str) -> list[tuple[str, str]]:
    """Split into ("text", ...) and ("action", ...) pieces, applying trim markers."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        pieces.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = source[pos:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as Nomad reads a template with ``env = true``."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values
