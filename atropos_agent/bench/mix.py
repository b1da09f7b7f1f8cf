"""The tool mix of a bench run: which calls each trajectory makes, in what proportion, and what
a right answer holds.

A mix is written ``shell=8,python=1,files=1,archive=1`` (weights; a bare name weighs 1). Each
entry is one or more calls (``files`` writes a file, then reads it back); every trajectory
goes round the same sequence, starting at its own offset, so that at any moment the calls in
flight follow the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHELL_COMMAND = "echo hi"
# CPU-bound, a few milliseconds of work after python3's start-up.
PYTHON_CODE = "print(sum(i * i for i in range(100_000)))"
PYTHON_OUTPUT = str(sum(i * i for i in range(100_000)))
FILE_PATH = "bench/data.txt"
FILE_CONTENT = "0123456789abcdef" * 64  # 1 KiB


@dataclass(frozen=True)
class Step:
    """One call: ``label`` names it in the report; ``tool`` is the sandbox tool it runs, or
    None for the artifacts archive route; ``expected`` is the output a right answer has
    (None: any successful answer)."""

    label: str
    tool: str | None
    arguments: dict[str, Any]
    expected: str | None = None


SHELL = Step("shell", "terminal", {"command": SHELL_COMMAND}, "hi")
ENTRIES: dict[str, tuple[Step, ...]] = {
    "shell": (SHELL,),
    "python": (Step("python", "python", {"code": PYTHON_CODE}, PYTHON_OUTPUT),),
    "files": (
        Step("write_file", "write_file", {"path": FILE_PATH, "content": FILE_CONTENT}),
        Step("read_file", "read_file", {"path": FILE_PATH}, FILE_CONTENT),
    ),
    "archive": (Step("archive", None, {"path": "."}),),
}
# The label of trivial calls: the figure compared with the spawn loop.
TRIVIAL = SHELL.label


@dataclass(frozen=True)
class ToolMix:
    """Entries of ``ENTRIES`` with their weights, in the order given."""

    weights: dict[str, int]
    sequence: tuple[Step, ...] = field(init=False)

    def __post_init__(self) -> None:
        steps = [step for name, weight in self.weights.items() for step in ENTRIES[name] * weight]
        object.__setattr__(self, "sequence", tuple(steps))

    @property
    def labels(self) -> list[str]:
        """Every call label the mix makes, each once, in sequence order."""
        return list(dict.fromkeys(step.label for step in self.sequence))

    def describe(self) -> str:
        return ",".join(f"{name}={weight}" for name, weight in self.weights.items())


def parse_mix(text: str) -> ToolMix:
    """``shell=8,python=1``; ``ValueError`` naming the entries there are."""
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in ENTRIES:
            raise ValueError(f"unknown mix entry {name!r}: choose from {', '.join(ENTRIES)}")
        try:
            weights[name] = int(weight) if weight else 1
        except ValueError:
            raise ValueError(f"mix weight of {name!r} must be an integer, not {weight!r}") from None
        if weights[name] < 1:
            raise ValueError(f"mix weight of {name!r} must be at least 1")
    if not weights:
        raise ValueError("the mix is empty: name at least one of " + ", ".join(ENTRIES))
    return ToolMix(weights)
