"""A small subset of Nomad's filter expressions (go-bexpr).

https://developer.hashicorp.com/nomad/api-docs#filtering

Supported: ``<Selector> == "<Value>"`` and ``<Selector> != "<Value>"`` (double-quoted or
backtick strings, or bare numbers/booleans), joined by ``and``. Selectors may be dotted
(``TaskStates.web.State``). Anything else is a 400, as Nomad answers an expression it
cannot read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .common import Json, NomadError

Predicate = Callable[[Json], bool]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<op>==|!=)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.\-\[\]"]*|-?\d+(?:\.\d+)?)
    )""",
    re.VERBOSE,
)


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = expression.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _bad(expression, f"unexpected input at offset {pos}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _bad(expression: str, why: str) -> NomadError:
    return NomadError(400, f"failed to read filter expression: {why} (in {expression!r})")


def _literal(kind: str, text: str) -> Any:
    if kind == "string":
        if text.startswith("`"):
            return text[1:-1]
        return bytes(text[1:-1], "utf-8").decode("unicode_escape")
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)


def _select(item: Json, selector: str) -> tuple[bool, Any]:
    value: Any = item
    for part in re.findall(r'[^.\[\]"]+', selector):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def compile_filter(expression: str, selectors: set[str]) -> Predicate:
    """Compile ``expression``; ``selectors`` are the top-level fields that may be named."""
    tokens = _tokens(expression)
    clauses: list[tuple[str, str, Any]] = []
    pos = 0
    while True:
        if pos + 3 > len(tokens):
            raise _bad(expression, "expected <Selector> ==|!= <Value>")
        (sel_kind, selector), (op_kind, op), (val_kind, value) = tokens[pos : pos + 3]
        if sel_kind != "word" or op_kind != "op" or val_kind not in ("string", "word"):
            raise _bad(expression, "expected <Selector> ==|!= <Value>")
        root = re.split(r"[.\[]", selector, maxsplit=1)[0]
        if root not in selectors:
            raise _bad(expression, f'Selector "{selector}" is not valid')
        clauses.append((selector, op, _literal(val_kind, value)))
        pos += 3
        if pos == len(tokens):
            break
        if tokens[pos] != ("word", "and"):
            raise _bad(expression, "only 'and' may join expressions in this double")
        pos += 1

    def matches(item: Json) -> bool:
        for selector, op, expected in clauses:
            found, actual = _select(item, selector)
            equal = found and (actual == expected or str(actual) == str(expected))
            if (op == "==") != equal:
                return False
        return True

    return matches
