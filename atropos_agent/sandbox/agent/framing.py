"""Frames on the pipe between the sandbox server and a slot agent, and the operations they name.

A frame is a 4-byte big-endian length, then that many bytes of JSON in UTF-8. Both ends import
this module: the agent (standard library only) and the server's ``sandbox/slot.py``.

The server sends one request and reads its answer before it sends the next, with two
exceptions, sent while a call may run: ``cancel``, answered by that call's own (cancelled)
answer, and by nothing when it finds the agent idle (the call it meant had already finished);
and ``shutdown``, which the server sends when it stops, whatever the slot is doing.

A tool request with ``"stream": true`` is answered by ``output`` frames as its command prints
(``agent/streaming.py``), then by its answer as usual.
"""

from __future__ import annotations

import json
import os
import re
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FRAME_HEADER = struct.Struct(">I")
# A request carries at most one file's content; anything larger is a broken peer.
MAX_FRAME_BYTES = 256 * 1024 * 1024

# The ``op`` of a request. The agent's first frame (``{"ready": true, ...}``) has none.
OP_TOOL = "tool"
OP_SHUTDOWN = "shutdown"
OP_CANCEL = "cancel"
# Sent by the agent, not the server: output of a streamed call, before its answer.
OP_OUTPUT = "output"
OP_ARTIFACT_READ = "artifact_read"
OP_ARTIFACT_LIST = "artifact_list"
OP_ARTIFACT_ARCHIVE = "artifact_archive"
# An upload staged in the slot's /tmp, to extract into the workspace (``agent/extract.py``).
OP_EXTRACT = "extract"
# The server made the slot's workspace anew under the running agent (layers): enter it again.
OP_WORKSPACE = "workspace"


class ChannelError(Exception):
    """The frame stream with the server is broken (a frame no honest peer sends, or an early
    end): the agent cannot tell which answer belongs to which request, so it stops."""


class StopRequested(Exception):
    """The server sent ``shutdown`` while a call ran: the agent stops without answering it."""


# A str may hold lone surrogates (os.listdir's names for file names that are not UTF-8);
# UTF-8 cannot. They travel as U+FFFD, as invalid bytes of a command's output do.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encode_frame(message: dict[str, Any]) -> bytes:
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        body = text.encode()
    except UnicodeEncodeError:
        body = LONE_SURROGATE.sub("\ufffd", text).encode()
    return FRAME_HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """The length a frame header announces; refuses one no honest peer would send."""
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return int(length)


def decode_body(body: bytes) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(body)
    return message


def read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``; None when it ends first."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    """The next message on ``fd``; None when the peer closed the pipe."""
    header = read_exact(fd, FRAME_HEADER.size)
    if header is None:
        return None
    body = read_exact(fd, body_length(header))
    return None if body is None else decode_body(body)


def write_frame(fd: int, message: dict[str, Any]) -> None:
    view = memoryview(encode_frame(message))
    while view:
        view = view[os.write(fd, view) :]
