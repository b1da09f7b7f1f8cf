"""The slot agent: the one long-lived process inside a slot.

The sandbox server starts one agent per slot, inside that slot's bubblewrap namespaces, and talks
to it over the agent's stdin/stdout with length-prefixed JSON frames. Keeping this process alive
is what makes a call cheap: isolation is set up once per slot, and each tool call costs one
``posix_spawn`` of the shell instead of a fresh sandbox.

This file runs under the *sandbox's* python3 (not the server's interpreter or virtualenv), so it
uses the standard library only. It is started as a script, not imported, inside the slot.

Process accounting: the agent is a child subreaper, so every process a command leaves behind
(background children, double-forked daemons) is re-parented to the agent rather than escaping
to the host's init. That is how a timeout kills *everything* a command started.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import stat
import struct
import sys
import time

# Every slot runs one agent, so its idle size matters: modules only some calls need (archives,
# hashing, mime types) are imported on first use, and typing only for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# How often a running command's disk use is measured against the slot's bound.
DISK_POLL_S = 0.25
# After a command exits, output still buffered in its pipe is read for at most this long
# (a background child may hold the pipe open forever; it does not delay the result).
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024
SIGNALS_RESET_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)

MEMORY_MARKERS = (
    b"memoryerror",
    b"cannot allocate memory",
    b"out of memory",
    b"std::bad_alloc",
    b"xmalloc: cannot allocate",
)
PROCESS_MARKERS = (
    b"fork: retry",
    b"fork: resource temporarily unavailable",
    b"cannot fork",
    b"can't fork",
    b"blockingioerror: [errno 11] resource temporarily unavailable",
)
FILE_SIZE_MARKERS = (b"file too large", b"file size limit exceeded")


class ToolError(Exception):
    """A failure the caller can act on; becomes ``success: false`` with this message."""


# --------------------------------------------------------------------------- framing


def read_exact(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_frame(fd: int) -> dict[str, Any] | None:
    header = read_exact(fd, FRAME_HEADER.size)
    if header is None:
        return None
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise SystemExit(f"agent: frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = read_exact(fd, length)
    if body is None:
        return None
    message: dict[str, Any] = json.loads(body)
    return message


def send_frame(fd: int, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    data = FRAME_HEADER.pack(len(body)) + body
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --------------------------------------------------------------------------- processes


def boottime_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks since boot, state) for live processes."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        state = fields[0].decode()
        if state in ("Z", "X"):
            continue
        table[int(name)] = (int(fields[1]), int(fields[19]), state)
    return table


def reap_children(keep: int = -1) -> None:
    """Collect exit statuses of re-parented orphans so they do not linger as zombies.

    ``keep`` is a running command's own process: its status is left for the caller, and
    reaping stops when it is the next one to collect (the command is then ending anyway).
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            pass
        SHELL.forget_if(info.si_pid)


def belongs(
    pid: int, table: dict[int, tuple[int, int, str]], root_pid: int, since_ticks: int, me: int
) -> bool:
    """Whether ``pid`` descends from ``root_pid``, or from an orphan started since the command."""
    node = pid
    while node != root_pid:
        parent = table[node][0] if node in table else None
        if parent is None:
            return False
        if parent == me:
            return table[node][1] >= since_ticks
        node = parent
    return True


def kill_command_tree(root_pid: int, since_ticks: int) -> int:
    """SIGKILL ``root_pid``, its descendants, and every orphan started since ``since_ticks``.

    Orphans of a command (double-forked daemons) are re-parented to this agent, so a child of
    the agent that was started after the command began belongs to that command. Returns the
    number of processes killed. Repeats until nothing is left, so a process that forks between
    two scans is caught by the next one.
    """
    me = os.getpid()
    killed: set[int] = set()
    for _ in range(200):
        table = process_table()
        victims = [
            pid for pid in table if pid != me and belongs(pid, table, root_pid, since_ticks, me)
        ]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        reap_children()
        time.sleep(0.005)
    reap_children()
    return len(killed)


class Outcome:
    """How supervising a command ended: which limits it hit, and the stateful status line."""

    def __init__(self, limit_hit: list[str], status_line: bytes) -> None:
        self.limit_hit = limit_hit
        self.status_line = status_line


class OutputCapture:
    """Keeps the head and the tail of a stream, counting what falls in between."""

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
            if len(self.tail) > 2 * self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > self.head_limit + self.tail_limit

    def lowered(self) -> bytes:
        return (bytes(self.head) + bytes(self.tail)).lower()

    def text(self) -> str:
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        tail = bytes(self.tail[-self.tail_limit :]) if self.tail_limit else b""
        omitted = self.total - len(self.head) - len(tail)
        marker = f"\n[... {omitted} bytes of output omitted ...]\n".encode()
        return (bytes(self.head) + marker + tail).decode("utf-8", "replace")


# --------------------------------------------------------------------------- the slot


class Slot:
    def __init__(self, config: dict[str, Any]) -> None:
        self.root = os.path.realpath(config["root"])
        self.scratch = [os.path.realpath(path) for path in config.get("scratch", [])]
        self.shell: str = config["shell"]
        self.python = config.get("python") or sys.executable
        self.max_output = int(config["max_output_bytes"])
        self.max_file = int(config["max_file_bytes"])
        self.disk_limit = int(config["disk_bytes"])
        self.max_processes = int(config["max_processes"])
        self.memory_limit = int(config["memory_bytes"])
        self.env = {str(k): str(v) for k, v in config["env"].items()}
        # Readable when a child of the agent exited (SIGCHLD wakeup fd; see apply_limits).
        self.child_exited_r = -1

    def disk_usage(self) -> int:
        used = 0
        stack = [self.root, *self.scratch]
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as entries:
                    for entry in entries:
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        used += info.st_blocks * 512
                        if stat.S_ISDIR(info.st_mode):
                            stack.append(entry.path)
            except OSError:
                continue
        return used

    # ---- paths

    def resolve(self, path: Any, *, for_write: bool = False) -> str:
        """Map a tool path to a real path inside the workspace, refusing every escape."""
        if not isinstance(path, str) or not path:
            raise ToolError("'path' must be a non-empty string")
        if "\x00" in path:
            raise ToolError("'path' must not contain NUL bytes")
        if path == "/workspace" or path.startswith("/workspace/"):
            path = path[len("/workspace") :].lstrip("/") or "."
        elif os.path.isabs(path):
            raise ToolError(f"absolute path {path!r} is outside /workspace; use a relative path")
        joined = os.path.normpath(os.path.join(self.root, path))
        if not self.inside(joined):
            raise ToolError(f"path {path!r} escapes the workspace")
        real: str = os.path.realpath(joined)
        if not self.inside(real):
            raise ToolError(f"path {path!r} leads out of the workspace through a symlink")
        if for_write:
            parent = os.path.dirname(real)
            os.makedirs(parent, exist_ok=True)
            if not self.inside(os.path.realpath(parent)):
                raise ToolError(f"path {path!r} leads out of the workspace through a symlink")
        return real

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def relative(self, real: str) -> str:
        return os.path.relpath(real, self.root)

    # ---- running processes

    def spawn(
        self, argv: list[str], stdin_fd: int, out_fd: int, extra: list[Any] | None = None
    ) -> int:
        actions: list[Any] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, out_fd, 2),
            *(extra or []),
        ]
        return os.posix_spawn(
            argv[0],
            argv,
            self.env,
            file_actions=actions,
            setsid=True,
            setsigdef=SIGNALS_RESET_IN_CHILD,
        )

    def run_process(
        self, argv: list[str], timeout: float, stdin_data: bytes | None = None
    ) -> dict[str, Any]:
        started = time.monotonic()
        # Taken before the spawn: whatever starts from here on belongs to this command.
        since = boottime_ticks()
        out_r, out_w = os.pipe()
        if stdin_data is None:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), -1
        else:
            in_r, in_w = os.pipe()
        try:
            pid = self.spawn(argv, in_r, out_w)
        except OSError as exc:
            for fd in (out_r, out_w, in_r, in_w):
                if fd >= 0:
                    os.close(fd)
            return failure(f"could not start {argv[0]}: {exc.strerror}", spawn_error=exc.errno)
        os.close(out_w)
        os.close(in_r)
        capture = OutputCapture(self.max_output)
        try:
            outcome = self.supervise(pid, out_r, in_w, stdin_data or b"", capture, timeout, started)
        finally:
            os.close(out_r)
        if outcome.limit_hit:
            # The kill reaps the command too: its exit status is "killed", not a code.
            killed = kill_command_tree(pid, since)
            exit_code = None
        else:
            killed = 0
            exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        reap_children()
        return self.describe(capture, exit_code, outcome.limit_hit, killed, started)

    def supervise(
        self,
        pid: int,
        out_r: int,
        in_w: int,
        stdin_data: bytes,
        capture: OutputCapture,
        timeout: float,
        started: float,
        done_r: int = -1,
    ) -> Outcome:
        """Pump output until the command finishes, times out, or exceeds the disk bound."""
        pidfd = os.pidfd_open(pid)
        selector = selectors.DefaultSelector()
        selector.register(out_r, selectors.EVENT_READ, "out")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        if self.child_exited_r >= 0:
            selector.register(self.child_exited_r, selectors.EVENT_READ, "child")
        if done_r >= 0:
            selector.register(done_r, selectors.EVENT_READ, "done")
        pending = memoryview(stdin_data)
        if in_w >= 0:
            os.set_blocking(in_w, False)
            selector.register(in_w, selectors.EVENT_WRITE, "in")
        deadline = started + timeout
        next_disk_check = started + DISK_POLL_S
        exited = finished = out_eof = False
        limit_hit: list[str] = []
        status_line = b""
        try:
            while not finished:
                now = time.monotonic()
                if now >= deadline:
                    limit_hit.append("timeout")
                    break
                if now >= next_disk_check:
                    next_disk_check = now + DISK_POLL_S
                    if self.disk_usage() > self.disk_limit:
                        limit_hit.append("disk")
                        break
                wait = min(deadline, next_disk_check) - now
                for key, _ in selector.select(wait):
                    if key.data == "out":
                        data = os.read(out_r, 65536)
                        if data:
                            capture.feed(data)
                        else:
                            out_eof = True
                            selector.unregister(out_r)
                    elif key.data == "exit":
                        exited = True
                        selector.unregister(pidfd)
                    elif key.data == "child":
                        # Orphans that exited count against RLIMIT_NPROC until reaped.
                        try:
                            os.read(self.child_exited_r, 4096)
                        except BlockingIOError:
                            pass
                        reap_children(keep=pid)
                    elif key.data == "done":
                        chunk = os.read(done_r, 64)
                        status_line += chunk
                        if b"\n" in status_line or not chunk:
                            finished = True
                    elif key.data == "in":
                        try:
                            pending = pending[os.write(in_w, pending[:65536]) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(in_w)
                            os.close(in_w)
                            in_w = -1
                if exited:
                    finished = True
            if not out_eof:
                drain(out_r, capture)
        finally:
            selector.close()
            os.close(pidfd)
            if in_w >= 0:
                os.close(in_w)
        return Outcome(limit_hit, status_line)

    def describe(
        self,
        capture: OutputCapture,
        exit_code: int | None,
        limit_hit: list[str],
        killed: int,
        started: float,
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "exit_code": exit_code,
            "duration_ms": round((time.monotonic() - started) * 1000, 3),
            "truncated": capture.truncated,
            "output_bytes": capture.total,
        }
        if exit_code is not None and exit_code < 0:
            metadata["signal"] = -exit_code
            metadata["exit_code"] = 128 - exit_code
        if capture.truncated:
            limit_hit.append("output")
        if metadata["exit_code"] not in (0, None) or killed:
            lowered = capture.lowered()
            if any(marker in lowered for marker in MEMORY_MARKERS):
                limit_hit.append("memory")
            if killed >= self.max_processes - 2 or any(m in lowered for m in PROCESS_MARKERS):
                limit_hit.append("processes")
            if any(marker in lowered for marker in FILE_SIZE_MARKERS):
                limit_hit.append("disk")
        if self.disk_usage() > self.disk_limit:
            if "disk" not in limit_hit:
                limit_hit.append("disk")
            # A writer left running in the background would go on filling the disk: stop
            # every process of the slot (the stateful shell restarts on its next call).
            killed += kill_command_tree(os.getpid(), 0)
        if killed:
            metadata["killed_processes"] = killed
        limit_hit = sorted(set(limit_hit))
        if limit_hit:
            metadata["limit_hit"] = limit_hit
        error = ""
        if "timeout" in limit_hit:
            metadata["timed_out"] = True
            error = f"command timed out after {metadata['duration_ms'] / 1000:.1f}s and was killed"
        elif "disk" in limit_hit:
            error = (
                f"workspace disk limit of {self.disk_limit // (1024 * 1024)} MiB exceeded; "
                "every process of the slot was stopped; delete files to continue"
            )
        elif metadata["exit_code"] not in (0, None):
            error = f"command exited with status {metadata['exit_code']}"
        if "memory" in limit_hit:
            error += f" (memory limit of {self.memory_limit // (1024 * 1024)} MiB per command)"
        if "processes" in limit_hit:
            error += f" (process limit of {self.max_processes} per slot)"
        return {
            "success": not error,
            "output": capture.text(),
            "error": error,
            "metadata": metadata,
        }

    # ---- tools

    def tool_terminal(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("'command' must be a non-empty string")
        if args.get("background"):
            raise ToolError(
                "background execution is not supported: run the command in the "
                "foreground, or start it with '&' and redirect its output to a file"
            )
        return self.run_process([self.shell, "-c", command], timeout)

    def tool_python(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        code = args.get("code", args.get("source"))
        if not isinstance(code, str):
            raise ToolError("'code' must be a string of Python source")
        return self.run_process([self.python, "-"], timeout, stdin_data=code.encode())

    def tool_terminal_stateful(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("'command' must be a non-empty string")
        return SHELL.run(self, command, timeout)

    def tool_read_file(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        real = self.resolve(args.get("path"))
        data, size, truncated = self.read_bytes(real, self.max_file)
        text = data.decode("utf-8", "replace")
        return {
            "success": True,
            "output": text,
            "error": "",
            "metadata": {
                "path": self.relative(real),
                "bytes": len(data),
                "file_size": size,
                "truncated": truncated,
            },
        }

    def tool_write_file(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolError("'content' must be a string")
        data = content.encode()
        if len(data) > self.max_file:
            raise ToolError(
                f"content of {len(data)} bytes exceeds the {self.max_file}-byte file write limit"
            )
        real = self.resolve(args.get("path"), for_write=True)
        self.write_bytes(real, data)
        return {
            "success": True,
            "output": f"wrote {len(data)} bytes to {self.relative(real)}",
            "error": "",
            "metadata": {"path": self.relative(real), "bytes": len(data)},
        }

    def tool_edit_file(self, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        old = args.get("old_string", args.get("old_str"))
        new = args.get("new_string", args.get("new_str"))
        if not isinstance(old, str) or not old:
            raise ToolError("'old_string' must be a non-empty string")
        if not isinstance(new, str):
            raise ToolError("'new_string' must be a string")
        real = self.resolve(args.get("path"))
        data, _, truncated = self.read_bytes(real, self.max_file)
        if truncated:
            raise ToolError(f"file is larger than the {self.max_file}-byte edit limit")
        text = data.decode("utf-8", "surrogateescape")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"'old_string' was not found in {self.relative(real)}")
        if count > 1:
            raise ToolError(
                f"'old_string' occurs {count} times in {self.relative(real)}; "
                "include more context so that it is unique"
            )
        updated = text.replace(old, new, 1).encode("utf-8", "surrogateescape")
        if len(updated) > self.max_file:
            raise ToolError(f"edited file would exceed the {self.max_file}-byte limit")
        self.write_bytes(real, updated)
        return {
            "success": True,
            "output": f"edited {self.relative(real)}",
            "error": "",
            "metadata": {"path": self.relative(real), "bytes": len(updated)},
        }

    def read_bytes(self, real: str, limit: int) -> tuple[bytes, int, bool]:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ToolError(f"no such file: {self.relative(real)}") from None
        except OSError as exc:
            raise ToolError(f"cannot open {self.relative(real)}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise ToolError(f"{self.relative(real)} is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{self.relative(real)} is not a regular file")
            data = handle.read(limit + 1)
        return data[:limit], info.st_size, len(data) > limit

    def write_bytes(self, real: str, data: bytes) -> None:
        if os.path.isdir(real):
            raise ToolError(f"{self.relative(real)} is a directory")
        used = self.disk_usage()
        existing = os.lstat(real).st_size if os.path.lexists(real) else 0
        if used - existing + len(data) > self.disk_limit:
            raise ToolError(
                f"writing {len(data)} bytes would exceed the workspace disk limit of "
                f"{self.disk_limit // (1024 * 1024)} MiB; delete files to continue"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(real, flags, 0o644)
        except OSError as exc:
            raise ToolError(f"cannot write {self.relative(real)}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    # ---- artifacts

    def artifact_read(self, req: dict[str, Any]) -> dict[str, Any]:
        import base64
        import mimetypes

        encoding = req.get("encoding") or "text"
        if encoding not in ("text", "base64"):
            raise ToolError("'encoding' must be 'text' or 'base64'")
        limit = bounded(req.get("max_bytes"), self.max_file, "max_bytes")
        real = self.resolve(req.get("path"))
        data, size, truncated = self.read_bytes(real, limit)
        sha = None
        if req.get("include_sha256"):
            import hashlib

            digest = hashlib.sha256()
            with open(real, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            sha = digest.hexdigest()
        content = (
            base64.b64encode(data).decode()
            if encoding == "base64"
            else data.decode("utf-8", "replace")
        )
        return {
            "success": True,
            "content": content,
            "error": "",
            "encoding": encoding,
            "truncated": truncated,
            "bytes": len(data),
            "file_size": size,
            "path": self.relative(real),
            "mime": mimetypes.guess_type(real)[0],
            "sha256": sha,
        }

    def artifact_list(self, req: dict[str, Any]) -> dict[str, Any]:
        limit = bounded(req.get("max_entries"), 5000, "max_entries")
        real = self.resolve(req.get("path") or ".")
        if not os.path.isdir(real):
            raise ToolError(f"{self.relative(real)} is not a directory")
        entries: list[dict[str, Any]] = []
        truncated = False
        stack = [real]
        while stack and not truncated:
            top = stack.pop(0)
            try:
                with os.scandir(top) as listing:
                    children = sorted(listing, key=lambda e: e.name)
            except OSError:
                continue
            for entry in children:
                if len(entries) >= limit:
                    truncated = True
                    break
                info = entry.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(info.st_mode)
                entries.append(
                    {
                        "path": self.relative(entry.path),
                        "is_dir": is_dir,
                        "size": info.st_size,
                        "mtime": info.st_mtime,
                    }
                )
                if is_dir and req.get("recursive"):
                    stack.append(entry.path)
        return {"success": True, "entries": entries, "truncated": truncated, "error": ""}

    def artifact_archive(self, req: dict[str, Any]) -> dict[str, Any]:
        import base64
        import gzip
        import io
        import tarfile

        fmt = req.get("format") or "tar.gz"
        if fmt not in ("tar.gz", "tgz"):
            raise ToolError("'format' must be 'tar.gz' or 'tgz'")
        max_bytes = bounded(req.get("max_bytes"), self.max_file, "max_bytes")
        max_entries = bounded(req.get("max_entries"), 5000, "max_entries")
        real = self.resolve(req.get("path") or ".")
        buffer = io.BytesIO()
        count = 0
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped,
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            for path in walk_no_follow(real):
                info = os.lstat(path)
                if not (
                    stat.S_ISREG(info.st_mode)
                    or stat.S_ISDIR(info.st_mode)
                    or stat.S_ISLNK(info.st_mode)
                ):
                    continue
                arcname = os.path.relpath(path, real)
                if arcname == ".":
                    # The archived directory itself is not an entry; a single file is one.
                    if stat.S_ISDIR(info.st_mode):
                        continue
                    arcname = os.path.basename(real)
                count += 1
                if count > max_entries:
                    raise ToolError(
                        f"archive would hold more than {max_entries} entries; "
                        "raise max_entries or archive a subdirectory"
                    )
                member = archive.gettarinfo(path, arcname)
                member.uid = member.gid = 0
                member.uname = member.gname = ""
                if member.isreg():
                    with open(path, "rb", opener=nofollow_opener) as handle:
                        archive.addfile(member, handle)
                else:
                    archive.addfile(member)
                if buffer.tell() > max_bytes:
                    raise ToolError(
                        f"archive exceeds max_bytes={max_bytes}; raise it or archive a subdirectory"
                    )
        data = buffer.getvalue()
        if len(data) > max_bytes:
            raise ToolError(
                f"archive exceeds max_bytes={max_bytes}; raise it or archive a subdirectory"
            )
        return {
            "success": True,
            "content": base64.b64encode(data).decode(),
            "error": "",
            "encoding": "base64",
            "format": "tar.gz",
            "bytes": len(data),
            "entry_count": count,
        }


class StatefulShell:
    """One persistent shell per slot: its working directory and variables survive calls.

    Commands are sent on the shell's stdin as ``eval '<quoted>'`` followed by a status line
    written to a private descriptor, so a syntax error in a command ends that command only.
    A command that times out kills the shell; the next call starts a fresh one and says so.
    """

    STATUS_FD_BASH = 87
    STATUS_FD_SH = 9

    def __init__(self) -> None:
        self.pid = -1
        self.stdin_w = -1
        self.out_r = -1
        self.status_r = -1
        self.status_fd = self.STATUS_FD_SH
        # Set when the shell was lost, so the next call can report that its state is gone.
        self.restarted = False

    def forget_if(self, pid: int) -> None:
        if pid == self.pid:
            self.close()

    def close(self) -> None:
        for fd in (self.stdin_w, self.out_r, self.status_r):
            if fd >= 0:
                os.close(fd)
        self.pid = self.stdin_w = self.out_r = self.status_r = -1

    def start(self, slot: Slot) -> None:
        status_fd = self.STATUS_FD_BASH if slot.shell.endswith("bash") else self.STATUS_FD_SH
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        status_r, status_w = os.pipe()
        argv = (
            [slot.shell, "--noprofile", "--norc"]
            if status_fd == self.STATUS_FD_BASH
            else [slot.shell]
        )
        try:
            self.pid = slot.spawn(argv, in_r, out_w, [(os.POSIX_SPAWN_DUP2, status_w, status_fd)])
        finally:
            for fd in (in_r, out_w, status_w):
                os.close(fd)
        self.stdin_w, self.out_r, self.status_r = in_w, out_r, status_r
        self.status_fd = status_fd

    def run(self, slot: Slot, command: str, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        restarted = False
        if self.pid < 0:
            restarted = self.restarted
            self.start(slot)
        since = boottime_ticks()
        script = (
            f"eval {shell_quote(command)} </dev/null\nprintf '%s\\n' \"$?\" >&{self.status_fd}\n"
        )
        try:
            os.write(self.stdin_w, script.encode())
        except BrokenPipeError:
            self.kill(since)
            raise ToolError("the stateful shell died; the next call starts a new one") from None
        capture = OutputCapture(slot.max_output)
        pid = self.pid
        outcome = slot.supervise(
            pid, self.out_r, -1, b"", capture, timeout, started, done_r=self.status_r
        )
        limit_hit = outcome.limit_hit
        status_text = outcome.status_line.decode(errors="replace").strip()
        killed = 0
        exit_code: int | None
        shell_exited = False
        if limit_hit:
            killed = self.kill(since)
            self.restarted = True
            exit_code = None
        elif status_text.isdigit():
            exit_code = int(status_text)
        else:
            _, status = os.waitpid(pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
            shell_exited = True
            self.close()
            self.restarted = True
        reap_children()
        result = slot.describe(capture, exit_code, limit_hit, killed, started)
        result["metadata"]["shell_restarted"] = restarted
        if shell_exited:
            result["metadata"]["shell_exited"] = True
            result["error"] = (
                result["error"] + "; " if result["error"] else ""
            ) + "the stateful shell exited; the next call starts a new one"
            result["success"] = False
        elif limit_hit:
            result["error"] += "; the stateful shell was restarted, its state is lost"
        return result

    def kill(self, since: int) -> int:
        killed = 0
        if self.pid > 0:
            killed = kill_command_tree(self.pid, since)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass  # already reaped while its tree was killed
        self.close()
        return killed


SHELL = StatefulShell()


# --------------------------------------------------------------------------- helpers


def shell_quote(text: str) -> str:
    """POSIX single-quoting: safe for any text without NUL bytes."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def failure(message: str, **metadata: Any) -> dict[str, Any]:
    return {"success": False, "output": "", "error": message, "metadata": metadata}


def bounded(value: Any, ceiling: int, name: str) -> int:
    if value is None:
        return ceiling
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ToolError(f"'{name}' must be a non-negative integer")
    return min(value, ceiling)


def drain(fd: int, capture: OutputCapture) -> None:
    os.set_blocking(fd, False)
    drained = 0
    try:
        while drained < DRAIN_LIMIT_BYTES:
            data = os.read(fd, 65536)
            if not data:
                return
            drained += len(data)
            capture.feed(data)
    except BlockingIOError:
        return
    finally:
        os.set_blocking(fd, True)


def walk_no_follow(top: str) -> list[str]:
    paths = [top]
    for current, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            paths.append(os.path.join(current, name))
    return paths


def nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


TOOLS = {
    "terminal": Slot.tool_terminal,
    "bash": Slot.tool_terminal,
    "terminal_stateful": Slot.tool_terminal_stateful,
    "read_file": Slot.tool_read_file,
    "write_file": Slot.tool_write_file,
    "edit_file": Slot.tool_edit_file,
    "python": Slot.tool_python,
}
ARTIFACTS = {
    "artifact_read": Slot.artifact_read,
    "artifact_list": Slot.artifact_list,
    "artifact_archive": Slot.artifact_archive,
}


def handle(slot: Slot, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "tool":
        tool = TOOLS.get(request.get("tool", ""))
        if tool is None:
            return failure(f"unknown tool {request.get('tool')!r}")
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return failure("tool arguments must be a JSON object")
        return tool(slot, args, float(request.get("timeout", 30.0)))
    artifact = ARTIFACTS.get(str(op))
    if artifact is not None:
        return artifact(slot, request)
    if op == "ping":
        return {"success": True, "pid": os.getpid()}
    if op == "disk_usage":
        return {"success": True, "bytes": slot.disk_usage()}
    return failure(f"unknown agent operation {op!r}")


def apply_limits(slot: Slot) -> None:
    """Limits on the agent are inherited by every command it starts."""
    resource.setrlimit(resource.RLIMIT_AS, (slot.memory_limit, slot.memory_limit))
    resource.setrlimit(resource.RLIMIT_NPROC, (slot.max_processes, slot.max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (slot.disk_limit, slot.disk_limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # A write past RLIMIT_FSIZE then fails with EFBIG in the agent instead of killing it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Orphans re-parented to the agent stay zombies, counted against RLIMIT_NPROC, until
    # reaped: SIGCHLD wakes the supervision loop so a long command that keeps starting
    # short-lived daemons does not run out of processes. (Commands' handlers reset on exec.)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    slot.child_exited_r = wake_r
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"agent: cannot become a child subreaper: errno {ctypes.get_errno()}")
    # Commands run as the same uid: non-dumpable, the agent cannot be ptraced by them, nor its
    # pipes to the server opened through /proc. (Each exec'd command is dumpable again.)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit(f"agent: cannot make itself non-dumpable: errno {ctypes.get_errno()}")


def main() -> None:
    slot = Slot(json.loads(sys.argv[1]))
    channel_in, channel_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.chdir(slot.root)
    apply_limits(slot)
    send_frame(channel_out, {"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
    while True:
        request = recv_frame(channel_in)
        if request is None:
            break
        if request.get("op") == "shutdown":
            break
        try:
            response = handle(slot, request)
        except ToolError as exc:
            response = failure(str(exc))
        except Exception as exc:  # the agent must answer every request, whatever went wrong
            response = failure(f"internal error in the slot agent: {exc!r}")
        send_frame(channel_out, response)
    # Whether asked to stop or abandoned by the server, leave no process of the slot behind.
    kill_command_tree(os.getpid(), 0)


if __name__ == "__main__":
    main()
