"""A streamed call's output, sent to the server as the command prints it.

A tool request may ask for ``stream``: each chunk its command writes is then also sent as an
``output`` frame (``{"op": "output", "stream": "stdout"|"stderr"|"output", "data": text}``)
before the call's answer, which is the same as without streaming. What is streamed is bounded
(``STREAM_LIMIT_BYTES`` per call; the answer still keeps the head and the tail), and text is
decoded incrementally, so a character split across two reads arrives whole.
"""

from __future__ import annotations

import codecs

from .framing import OP_OUTPUT, write_frame

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .output import OutputCapture

STREAM_LIMIT_BYTES = 4 * 1024 * 1024
TRUNCATED = "\n[... streamed output stops here: the call's answer has its head and tail ...]\n"


class OutputStream:
    """Sends one call's output frames on the channel to the server."""

    def __init__(self, channel_out: int) -> None:
        self.channel_out = channel_out
        self.sent = 0
        self.decoders: dict[str, Any] = {}

    def tee(self, capture: OutputCapture | None, name: str) -> Any:
        """``capture``, also streaming what it is fed (None stays None)."""
        return None if capture is None else Tee(capture, self, name)

    def send(self, name: str, data: bytes) -> None:
        if self.sent >= STREAM_LIMIT_BYTES:
            return
        room = STREAM_LIMIT_BYTES - self.sent
        self.sent += len(data)
        decoder = self.decoders.get(name)
        if decoder is None:
            decoder = self.decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data[:room])
        if self.sent >= STREAM_LIMIT_BYTES:
            text += TRUNCATED
        if text:
            write_frame(self.channel_out, {"op": OP_OUTPUT, "stream": name, "data": text})


class Tee:
    """An ``OutputCapture`` that streams what it is fed; everything else is the capture's."""

    def __init__(self, capture: OutputCapture, stream: OutputStream, name: str) -> None:
        self.capture = capture
        self.stream = stream
        self.name = name

    def feed(self, data: bytes) -> None:
        self.capture.feed(data)
        self.stream.send(self.name, data)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.capture, attribute)
