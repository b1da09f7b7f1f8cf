"""A command's output as a caller gets it: the head and the tail kept, the middle counted.

Two forms (the ``terminal_output`` setting):

- ``split`` (default, the old service's): stdout and stderr captured apart, answered as
  stdout, then ``"\\n[stderr]\\n"`` and stderr when stderr is not empty (stderr alone when
  stdout is empty), stripped: ``echo out; echo err >&2`` gives ``"out\\n\\n[stderr]\\nerr"``;
- ``merged``: both streams interleaved in one pipe as a terminal shows them, not stripped.
"""

from __future__ import annotations

STDERR_HEADER = "\n[stderr]\n"


class OutputCapture:
    """Keeps the first and last halves of ``max_bytes`` of a stream, counting what falls between."""

    def __init__(self, max_bytes: int) -> None:
        self.head_limit = max_bytes // 2
        self.tail_limit = max_bytes - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            # Trimmed only once it holds twice the tail: each byte is moved O(1) times.
            if len(self.tail) > 2 * self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def kept_limit(self) -> int:
        return self.head_limit + self.tail_limit

    @property
    def truncated(self) -> bool:
        return self.total > self.kept_limit

    def lowered(self) -> bytes:
        """What was kept, lower-cased: where limit markers are looked for."""
        return (bytes(self.head) + bytes(self.tail)).lower()

    def text(self, limit: int | None = None) -> str:
        """The stream, head and tail of at most ``limit`` bytes (default: the whole capture)."""
        if limit is None or limit > self.kept_limit:
            limit = self.kept_limit
        if self.total <= limit:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        head_size = limit // 2
        tail_size = limit - head_size
        if self.truncated:
            # The head holds head_limit >= head_size bytes, the tail at least tail_limit.
            head = bytes(self.head[:head_size])
            tail = bytes(self.tail[len(self.tail) - tail_size :]) if tail_size else b""
        else:
            # Everything is held, contiguous: cut it to the smaller budget.
            whole = bytes(self.head) + bytes(self.tail)
            head = whole[:head_size]
            tail = whole[len(whole) - tail_size :] if tail_size else b""
        omitted = self.total - len(head) - len(tail)
        marker = f"\n[... {omitted} bytes of output omitted ...]\n".encode()
        return (head + marker + tail).decode("utf-8", "replace")


class CommandOutput:
    """A command's streams: ``stdout`` alone (merged form) or stdout and ``stderr`` (split).

    In the split form both streams share ``max_bytes``: each is captured up to the whole
    bound, and when together they exceed it, the smaller keeps up to half and the larger the
    rest, so an answer never holds much more than ``max_bytes`` whatever the mix.
    """

    def __init__(self, max_bytes: int, split: bool) -> None:
        self.max_bytes = max_bytes
        self.stdout = OutputCapture(max_bytes)
        self.stderr = OutputCapture(max_bytes) if split else None

    @property
    def split(self) -> bool:
        return self.stderr is not None

    @property
    def total(self) -> int:
        return self.stdout.total + (self.stderr.total if self.stderr is not None else 0)

    @property
    def truncated(self) -> bool:
        return self.total > self.max_bytes

    def lowered(self) -> bytes:
        """Both streams as kept, lower-cased: where limit markers are looked for."""
        if self.stderr is None:
            return self.stdout.lowered()
        return self.stdout.lowered() + b"\n" + self.stderr.lowered()

    def budgets(self) -> tuple[int, int]:
        """Bytes of stdout and of stderr an answer keeps."""
        out = self.stdout.total
        err = self.stderr.total if self.stderr is not None else 0
        if out + err <= self.max_bytes:
            return out, err
        half = self.max_bytes // 2
        if err <= half:
            return self.max_bytes - err, err
        if out <= half:
            return out, self.max_bytes - out
        return self.max_bytes - half, half

    def text(self) -> str:
        if self.stderr is None:
            return self.stdout.text()
        out_budget, err_budget = self.budgets()
        out = self.stdout.text(out_budget)
        err = self.stderr.text(err_budget)
        if err:
            out = out + STDERR_HEADER + err if out else err
        return out.strip()
