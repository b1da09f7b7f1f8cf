"""The ``tmux`` session's recording: an asciinema v2 cast written by a thread of the agent,
and reading it back in whole lines."""

from __future__ import annotations

import _thread
import codecs
import json
import os
import select
import time

from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Pane output one cast event holds at most (a line of at most ~6x that, escaped).
EVENT_BYTES = 4096


class Recorder:
    """Appends the pane's output, read from a FIFO, to an asciinema v2 cast, in a thread.

    The FIFO is held open for reading *and* writing, so opening it never blocks and a writer
    that goes away is no end of file; ``stop()`` ends the thread after it drained the FIFO.
    """

    def __init__(self, fifo: str, cast: str, cap: int, header: dict[str, Any]) -> None:
        self.cap = cap
        self.capped = False
        self.error = ""
        self.started = time.monotonic()
        self.fifo_fd = self.cast_fd = self.stop_r = self.stop_w = -1
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.done = _thread.allocate_lock()
        try:
            self.fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
            self.cast_fd = os.open(cast, flags, 0o600)
            self.stop_r, self.stop_w = os.pipe()
            line = (json.dumps(header) + "\n").encode()
            os.write(self.cast_fd, line)
            self.size = len(line)
            self.done.acquire()
            _thread.start_new_thread(self.run, ())
        except RuntimeError as exc:  # no thread to be had (the slot's process limit)
            self.close()
            raise ToolError(f"could not start the recorder: {exc}") from None
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.fifo_fd, self.cast_fd, self.stop_r, self.stop_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fifo_fd = self.cast_fd = self.stop_r = self.stop_w = -1

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.fifo_fd, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self.fifo_fd in ready:
                    self.pump()
                if self.stop_r in ready:
                    while self.pump():
                        pass
                    return
        except Exception as exc:  # the recording ends; the session goes on
            self.error = repr(exc)
        finally:
            self.done.release()

    def pump(self) -> bool:
        """Record one read of the FIFO; False when nothing was waiting."""
        try:
            data = os.read(self.fifo_fd, EVENT_BYTES)
        except BlockingIOError:
            return False
        if not data:
            return False
        text = self.decoder.decode(data)
        if text:
            self.event("o", text)
        return True

    def event(self, kind: str, text: str) -> None:
        if self.capped:
            return
        elapsed = round(time.monotonic() - self.started, 6)
        line = (json.dumps([elapsed, kind, text]) + "\n").encode()
        if self.size + len(line) > self.cap:
            self.capped = True
            line = (
                json.dumps([elapsed, "m", f"recording stopped: {self.cap}-byte cap reached"]) + "\n"
            ).encode()
        try:
            os.write(self.cast_fd, line)
            self.size += len(line)
        except OSError as exc:  # disk bound (EFBIG, ENOSPC): the recording ends here
            self.capped = True
            self.error = exc.strerror or repr(exc)

    def stop(self) -> None:
        """Record what is left in the FIFO, end the thread, close everything."""
        try:
            os.write(self.stop_w, b"x")
        except OSError:
            pass
        self.done.acquire(timeout=5)
        self.close()


def read_lines(cast: str, cursor: int, limit: int) -> tuple[bytes, int, int]:
    """Whole lines of ``cast`` from ``cursor`` (from the start when the cast is shorter), at
    most ``limit`` bytes unless one line is longer: it then comes whole, alone, so that a
    reader always moves on. Returns the lines, where they start, and the cast's size."""
    with open(cast, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = 0 if cursor > size else cursor
        handle.seek(start)
        data = handle.read(limit)
        end = data.rfind(b"\n")
        if end < 0 and len(data) == limit:
            # A line longer than max_bytes comes whole, alone: the stream must move on.
            while end < 0:
                more = handle.read(65536)
                if not more:
                    break
                end = more.find(b"\n")
                data += more
                if end >= 0:
                    end = len(data) - len(more) + end
        data = data[: end + 1]
    return data, start, size
