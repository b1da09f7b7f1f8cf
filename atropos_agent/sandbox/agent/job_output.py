"""A background job's output: its bytes numbered from 0, the head and the tail kept, read on
from any offset.

A poller asks for the bytes since an offset and is told the next one, so that polling from
each answer's ``next`` returns every byte once. The buffer is bounded: the first half of it
keeps the head, the rest the latest bytes; a poller that falls behind the tail is told how many
bytes between its offset and the first one still held were dropped.
"""

from __future__ import annotations

from .output import OutputCapture


def complete_utf8(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 sequence cut short at its end (the rest of it
    has not been read yet, or lies beyond the answer's bound)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)
        if byte >= 0xC0:  # a lead byte: complete when its continuation bytes all follow
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if needed > back else len(data)
    return len(data)


class JobOutput(OutputCapture):
    """The bytes a job wrote, stdout and stderr merged, as numbered positions in one stream:
    the head and the latest bytes kept (``OutputCapture``), the tail at positions
    ``total - len(tail)`` to ``total``."""

    def settle(self) -> None:
        """No byte will follow: keep the tail at its bound, in memory of that size."""
        self.tail = bytearray(self.tail[len(self.tail) - min(len(self.tail), self.tail_limit) :])

    @property
    def tail_start(self) -> int:
        return self.total - len(self.tail)

    @property
    def dropped(self) -> int:
        """Bytes no longer held: those between the head and the tail."""
        return self.tail_start - len(self.head)

    def read(self, since: int, limit: int, complete: bool) -> tuple[bytes, int]:
        """The held bytes from position ``since`` on (at most ``limit``), one contiguous piece,
        and the position of its first byte (after ``since`` when bytes in between were
        dropped). ``complete``: no byte will follow, so a character cut at the end is not held
        back for the next read."""
        head_end = len(self.head)
        if since < head_end:
            start = since
            piece = bytes(self.head[since : min(head_end, since + limit)])
        else:
            start = max(since, self.tail_start)
            offset = start - self.tail_start
            piece = bytes(self.tail[offset : offset + limit])
        # A character cut by the bound, or by the end of what was written so far, comes whole
        # with the next read (one cut where the head ends stays cut: the tail goes on apart).
        at_end = start + len(piece) == self.total
        if len(piece) == limit or (at_end and not complete):
            piece = piece[: complete_utf8(piece)]
        return piece, start
