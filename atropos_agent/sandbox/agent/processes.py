"""Running commands: spawn one, supervise it against the slot's limits, kill what it leaves.

The agent is a child subreaper (``config.apply_limits``), so every process a command leaves
behind (background children, double-forked daemons) is re-parented to the agent rather than
escaping to the host's init. That is how a timeout kills *everything* a command started: its
descendants, and the agent's children that started after it did.

While a command runs, the agent's one thread sits in ``Runner.supervise``; that loop also
watches the request channel, so that a ``cancel`` frame from the server ends the call at once,
with the same kill a timeout makes. It services the slot's background jobs too
(``Runner.background``, ``jobs.py``), so that their output is read while a command runs.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import time

from .framing import OP_CANCEL, OP_SHUTDOWN, ChannelError, StopRequested, read_frame
from .output import CommandOutput, OutputCapture
from .results import command_result, failure, limits_seen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from .config import AgentConfig
    from .jobs import Jobs
    from .streaming import OutputStream
    from .workspace import Workspace

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# How often a running command's disk use is measured against the slot's bound.
DISK_POLL_S = 0.25
# After a command exits, output still buffered in its pipe is read for at most this long
# (a background child may hold the pipe open forever; it does not delay the result).
DRAIN_LIMIT_BYTES = 4 * 1024 * 1024
# The agent ignores or handles these; a command starts with the default dispositions.
SIGNALS_RESET_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM)
# pid -> (parent pid, start time in clock ticks since boot, state)
ProcessTable = dict[int, tuple[int, int, str]]


def boottime_ticks() -> int:
    """Now, in the clock of /proc/PID/stat's start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


def live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every live process the
    agent can see (zombies and dead ones left out)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X"):
            yield int(name), fields


def process_table() -> ProcessTable:
    """Every live process this agent can see: parent, start time, state."""
    return {
        pid: (int(fields[1]), int(fields[19]), fields[0].decode())
        for pid, fields in live_processes()
    }


def kill_each(pids: list[int]) -> list[int]:
    """SIGKILL each of ``pids``; the ones that were still there to kill."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def belongs(pid: int, table: ProcessTable, root_pid: int, since_ticks: int, me: int) -> bool:
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


def drain(fd: int, capture: OutputCapture) -> None:
    """Read what is already in a pipe, without waiting for writers that linger."""
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


class Outcome:
    """How supervising a command ended: which limits it hit, whether the call was cancelled,
    and the stateful status line."""

    def __init__(self, limit_hit: list[str], status_line: bytes, cancelled: bool) -> None:
        self.limit_hit = limit_hit
        self.status_line = status_line
        self.cancelled = cancelled

    @property
    def stopped(self) -> bool:
        """Whether the command was stopped before its end (and so must be killed)."""
        return bool(self.limit_hit) or self.cancelled


class Runner:
    """Starts commands in the slot's environment and holds them to its limits."""

    def __init__(
        self, config: AgentConfig, workspace: Workspace, child_exited_r: int, requests_r: int = -1
    ) -> None:
        self.config = config
        self.workspace = workspace
        # Readable when a child of the agent exited (SIGCHLD wake-up fd; -1: not watched).
        self.child_exited_r = child_exited_r
        # The server's request channel, watched while a command runs (-1: not watched).
        self.requests_r = requests_r
        # Where the running call's output goes as it is read, when the call asked for it.
        self.stream: OutputStream | None = None
        # The slot's background jobs (agent/jobs.py), serviced whenever this runner waits:
        # their output read, their timeouts fired, their exits noted (None: no job yet).
        self.background: Jobs | None = None
        # Set when the server cancelled the call now running (the agent clears it per call):
        # its command ends at once, and so does any the call would start after it.
        self.cancelled = False
        # Long-lived children whose owner must learn when they are reaped (the stateful
        # shell): pid -> what to call then.
        self.watched: dict[int, Callable[[], None]] = {}

    def captures(self, output: CommandOutput) -> tuple[Any, Any]:
        """Where a command's stdout and stderr are read into: ``output``'s captures, teed to
        the server as they are fed when the call streams (``agent/streaming.py``)."""
        if self.stream is None:
            return output.stdout, output.stderr
        stdout_name = "stdout" if output.split else "output"
        return self.stream.tee(output.stdout, stdout_name), self.stream.tee(output.stderr, "stderr")

    def end_child(self, pid: int, since: int) -> int:
        """Kill a long-lived child (the stateful shell, the Python interpreter) and what its
        current call started, and reap it; returns how many processes died."""
        if pid <= 0:
            return 0
        killed = self.kill_tree(pid, since)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # already reaped while its tree was killed
        return killed

    def spawn(
        self,
        argv: list[str],
        stdin_fd: int,
        out_fd: int,
        extra: list[Any] | None = None,
        env: dict[str, str] | None = None,
        err_fd: int = -1,
    ) -> int:
        """Start ``argv`` in a new session, stdout into ``out_fd``, stderr into ``err_fd``
        (-1: merged into ``out_fd``).

        ``env`` replaces the slot's command environment (``tmux`` adds to it).
        """
        actions: list[Any] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, out_fd if err_fd < 0 else err_fd, 2),
            *(extra or []),
        ]
        return os.posix_spawn(
            argv[0],
            argv,
            self.config.env if env is None else env,
            file_actions=actions,
            setsid=True,
            setsigdef=SIGNALS_RESET_IN_CHILD,
        )

    def run(
        self, argv: list[str], timeout: float, stdin_data: bytes | None = None
    ) -> dict[str, Any]:
        """Run one command to its end (or its limit) and answer with its result.

        Its stdout and stderr are captured apart or merged, as ``terminal_output`` says.
        """
        started = time.monotonic()
        # Taken before the spawn: whatever starts from here on belongs to this command.
        since = boottime_ticks()
        output = CommandOutput(self.config.max_output_bytes, self.config.split_output)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if output.split else (-1, -1)
        if stdin_data is None:
            in_r, in_w = os.open(os.devnull, os.O_RDONLY), -1
        else:
            in_r, in_w = os.pipe()
        try:
            pid = self.spawn(argv, in_r, out_w, err_fd=err_w)
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
                if fd >= 0:
                    os.close(fd)
            return failure(f"could not start {argv[0]}: {exc.strerror}", spawn_error=exc.errno)
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
        stdout_capture, stderr_capture = self.captures(output)
        try:
            outcome = self.supervise(
                pid,
                out_r,
                in_w,
                stdin_data or b"",
                stdout_capture,
                timeout,
                started,
                err_r=err_r,
                err_capture=stderr_capture,
            )
        finally:
            os.close(out_r)
            if err_r >= 0:
                os.close(err_r)
        if outcome.stopped:
            # The kill reaps the command too: its exit status is "killed", not a code.
            killed = self.kill_tree(pid, since)
            exit_code = None
        else:
            killed = 0
            exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        self.reap()
        return self.finish(
            output, exit_code, outcome.limit_hit, killed, started, timeout, outcome.cancelled
        )

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
        *,
        err_r: int = -1,
        err_capture: OutputCapture | None = None,
    ) -> Outcome:
        """Pump output until the command finishes, times out, exceeds the disk bound, or the
        server cancels the call.

        A command has finished when its process exits, or, with ``done_r`` (the stateful
        shell's status pipe), when a status line arrives there. With ``err_r``, stderr comes
        apart from stdout and goes to ``err_capture``.
        """
        pidfd = os.pidfd_open(pid)
        selector = selectors.DefaultSelector()
        # Each output pipe with the capture it feeds; both are drained once the command ends.
        streams = {out_r: capture}
        if err_r >= 0 and err_capture is not None:
            streams[err_r] = err_capture
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ, "out")
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        if self.child_exited_r >= 0:
            selector.register(self.child_exited_r, selectors.EVENT_READ, "child")
        if done_r >= 0:
            selector.register(done_r, selectors.EVENT_READ, "done")
        if self.requests_r >= 0:
            selector.register(self.requests_r, selectors.EVENT_READ, "request")
        if self.background is not None:
            selector.register(self.background.fileno(), selectors.EVENT_READ, "background")
        pending = memoryview(stdin_data)
        if in_w >= 0:
            # Fed as the pipe takes it: a command that never reads its stdin cannot block us.
            os.set_blocking(in_w, False)
            selector.register(in_w, selectors.EVENT_WRITE, "in")
        deadline = started + timeout
        next_disk_check = started + DISK_POLL_S
        exited = finished = False
        open_streams = set(streams)
        limit_hit: list[str] = []
        status_line = b""
        try:
            while not finished:
                if self.cancelled:
                    break
                now = time.monotonic()
                if now >= deadline:
                    limit_hit.append("timeout")
                    break
                if now >= next_disk_check:
                    next_disk_check = now + DISK_POLL_S
                    if self.workspace.disk_usage() > self.workspace.disk_limit:
                        limit_hit.append("disk")
                        break
                wait = min(deadline, next_disk_check) - now
                if self.background is not None:
                    wait = min(wait, self.background.expire(now) - now)
                for key, _ in selector.select(wait):
                    if key.data == "out":
                        fd = key.fd
                        data = os.read(fd, 65536)
                        if data:
                            streams[fd].feed(data)
                        else:
                            open_streams.discard(fd)
                            selector.unregister(fd)
                    elif key.data == "exit":
                        exited = True
                        selector.unregister(pidfd)
                    elif key.data == "child":
                        # Orphans that exited count against RLIMIT_NPROC until reaped.
                        try:
                            os.read(self.child_exited_r, 4096)
                        except BlockingIOError:
                            pass
                        self.reap(keep=pid)
                    elif key.data == "done":
                        chunk = os.read(done_r, 64)
                        status_line += chunk
                        if b"\n" in status_line or not chunk:
                            finished = True
                    elif key.data == "request":
                        self.read_request()
                    elif key.data == "background" and self.background is not None:
                        self.background.service()
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
            for fd in open_streams:
                drain(fd, streams[fd])
        finally:
            selector.close()
            os.close(pidfd)
            if in_w >= 0:
                os.close(in_w)
        return Outcome(limit_hit, status_line, self.cancelled)

    def read_request(self) -> None:
        """Read the frame the server sent while a call runs: a ``cancel``, or the ``shutdown``
        of a server that stops; anything else breaks the channel (the server sends a slot's
        calls one at a time)."""
        try:
            message = read_frame(self.requests_r)
        except ValueError as exc:
            raise ChannelError(f"malformed frame while a call ran: {exc}") from None
        if message is None:
            raise ChannelError("the server closed the channel while a call ran")
        if message.get("op") == OP_SHUTDOWN:
            raise StopRequested
        if message.get("op") != OP_CANCEL:
            raise ChannelError(f"unexpected frame while a call ran: op {message.get('op')!r}")
        self.cancelled = True

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a tool's wait that runs no command), ended early by a cancel."""
        deadline = time.monotonic() + seconds
        while not self.cancelled and (left := deadline - time.monotonic()) > 0:
            if self.requests_r < 0:
                time.sleep(left)
                return
            watched = [self.requests_r]
            if self.background is not None:
                watched.append(self.background.fileno())
                left = min(left, self.background.expire(time.monotonic()) - time.monotonic())
            ready, _, _ = select.select(watched, [], [], max(0.0, left))
            if self.background is not None:
                self.background.service()
            if self.requests_r in ready:
                self.read_request()

    def finish(
        self,
        output: CommandOutput,
        exit_code: int | None,
        limit_hit: list[str],
        killed: int,
        started: float,
        timeout: float | None = None,
        was_cancelled: bool = False,
    ) -> dict[str, Any]:
        """The result of a command that ended: its limits read, the disk bound enforced."""
        limit_hit = limit_hit + limits_seen(output, exit_code, killed, self.config)
        if self.workspace.disk_usage() > self.workspace.disk_limit:
            limit_hit.append("disk")
            # A writer left running in the background would go on filling the disk: stop
            # every process of the slot (the stateful shell restarts on its next call).
            killed += self.kill_tree(os.getpid(), 0)
        return command_result(
            output, exit_code, limit_hit, killed, started, self.config, timeout, was_cancelled
        )

    def reap(self, keep: int = -1) -> None:
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
            gone = self.watched.pop(info.si_pid, None)
            if gone is not None:
                gone()
            if self.background is not None:
                self.background.reaped(info)

    def kill_tree(self, root_pid: int, since_ticks: int) -> int:
        """SIGKILL ``root_pid``, its descendants, and every orphan started since ``since_ticks``.

        Returns the number of processes killed. Repeats until nothing is left, so a process
        that forks between two scans is caught by the next one.
        """
        me = os.getpid()
        killed: set[int] = set()
        for _ in range(200):
            table = process_table()
            victims = [p for p in table if p != me and belongs(p, table, root_pid, since_ticks, me)]
            if since_ticks and self.background is not None:
                # A command's kill never takes a background job, started in the same clock
                # tick as the command or not (the slot's whole kill, since 0, takes them all).
                victims = self.background.spare(victims)
            if not victims:
                break
            killed.update(kill_each(victims))
            self.reap()
            time.sleep(0.005)
        self.reap()
        return len(killed)
