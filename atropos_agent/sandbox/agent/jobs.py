"""Background jobs: commands of a slot that run on while its calls come and go.

A job starts as a ``terminal`` command does (the slot's shell, environment, working directory
and limits; stdin ``/dev/null``), with stdout and stderr merged into one pipe, and the call
answers at once with its ``task_id``. The agent has one thread, so a job's pipe is read
whenever that thread waits: idle between requests (``Jobs.wait_for_request``, called by the
request loop instead of blocking on the channel), and while a command runs
(``processes.Runner`` services ``Runner.background`` from its supervision loop and its pauses).
A chatty job therefore never blocks on a full pipe for longer than one call that runs no
command, and a job's timeout fires on time whether or not requests arrive.

Bounds: ``MAX_RUNNING`` jobs run at once per slot, the ``MAX_KEPT`` latest finished ones stay
for polling (older ones are forgotten), each keeps ``BUFFER_BYTES`` of output (head and tail,
``job_output.py``), and one poll answers at most the slot's output bound.

A job is its process, everything descending from it, and everything left in its session (a
job runs in a session of its own, so what it leaves behind is found after the job's own
process exited). A kill or a timeout ends all of that; a process that started a session of its
own (a daemon) is beyond it, as it is beyond a foreground command's. A foreground command's
timeout or cancel kills what that command started and spares the running jobs (``spare``:
start times alone cannot tell a job started in the same clock tick from the command's own
orphans). A reset restarts the agent: every job ends with it.
"""

from __future__ import annotations

import os
import selectors
import time

from .job_output import JobOutput
from .processes import kill_each, live_processes
from .results import ToolError
from .tools import command_argument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .main import Agent
    from .processes import Runner

MAX_RUNNING = 16
MAX_KEPT = 16
BUFFER_BYTES = 1024 * 1024
READ_BYTES = 65536
# Output still in a job's pipe when its process ends is read at once, up to this much (a
# descendant may go on writing; the rest is read as it comes).
DRAIN_BYTES = 1024 * 1024
INFINITY = float("inf")

RUNNING = "running"
EXITED = "exited"
TIMED_OUT = "timed_out"
KILLED = "killed"


class Job:
    """One background job: its process, its output pipe, its buffer, how it ended."""

    def __init__(self, task_id: str, command: str, pid: int, timeout_s: float) -> None:
        self.task_id = task_id
        self.command = command
        self.pid = pid
        self.timeout_s = timeout_s
        self.output = JobOutput(BUFFER_BYTES)
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.ended: float | None = None
        self.status = RUNNING
        # As ``os.waitstatus_to_exitcode`` gives it (-N: killed by signal N); None: the agent
        # killed the job, or it still runs.
        self.exit_code: int | None = None
        # -1 once closed: the pipe at its end of file, the process reaped.
        self.out_r = -1
        self.pidfd = -1

    @property
    def active(self) -> bool:
        """Whether anything of the job may still run: its process, or a writer of its pipe."""
        return self.pidfd >= 0 or self.out_r >= 0

    def runtime_s(self) -> float:
        return round((self.ended or time.monotonic()) - self.started, 3)

    def describe(self) -> dict[str, Any]:
        """The job as a listing shows it, and as every answer about it carries it."""
        state: dict[str, Any] = {
            "task_id": self.task_id,
            "command": self.command,
            "status": self.status,
            "runtime_s": self.runtime_s(),
            "timeout_s": self.timeout_s,
            "output_bytes": self.output.total,
        }
        if self.exit_code is not None:
            if self.exit_code < 0:  # as a shell reports a death by signal N: 128 + N
                state["signal"] = -self.exit_code
                state["exit_code"] = 128 - self.exit_code
            else:
                state["exit_code"] = self.exit_code
        return state


def exit_code_of(info: os.waitid_result) -> int:
    """A child's exit as ``os.waitstatus_to_exitcode`` gives it, from ``os.waitid``."""
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def session_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process the agent can see."""
    return {pid: (int(fields[1]), int(fields[3])) for pid, fields in live_processes()}


def session_of(pid: int) -> int:
    """The session id of ``pid`` (-1: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return -1
    return int(raw[raw.rindex(b")") + 2 :].split()[3])


class Jobs:
    """The slot's background jobs, made on the first one (an idle slot carries none of this).

    ``Runner`` calls ``fileno``, ``service``, ``expire``, ``spare`` and ``reaped`` (it holds
    this as ``background``).
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        # By task id, oldest first.
        self.jobs: dict[str, Job] = {}
        self.by_pid: dict[int, Job] = {}
        # The jobs' pipes and pidfds. Its own descriptor is readable when one of them is, which
        # is how the supervision loop and the idle wait watch them all as one.
        self.selector = selectors.DefaultSelector()
        # The idle wait's: the request channel, the jobs, the SIGCHLD wake-up (made on first use).
        self.idle: selectors.BaseSelector | None = None
        runner.background = self

    # ---- starting, finding, stopping

    def start(self, command: str, timeout_s: float) -> Job:
        running = sum(1 for job in self.jobs.values() if job.status == RUNNING)
        if running >= MAX_RUNNING:
            raise ToolError(
                f"this slot already runs {running} background jobs, the most it may: wait for "
                "one to end (check_background) or stop one (background_kill)"
            )
        shell = self.runner.config.shell
        out_r, out_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            pid = self.runner.spawn([shell, "-c", command], stdin, out_w)
        except OSError as exc:
            os.close(out_r)
            raise ToolError(f"could not start {shell}: {exc.strerror}") from None
        finally:
            os.close(out_w)
            os.close(stdin)
        task_id = f"job-{os.urandom(4).hex()}"
        while task_id in self.jobs:
            task_id = f"job-{os.urandom(4).hex()}"
        job = Job(task_id, command, pid, timeout_s)
        job.out_r = out_r
        job.pidfd = os.pidfd_open(pid)
        os.set_blocking(out_r, False)
        self.selector.register(out_r, selectors.EVENT_READ, job)
        self.selector.register(job.pidfd, selectors.EVENT_READ, job)
        self.jobs[task_id] = job
        self.by_pid[pid] = job
        return job

    def get(self, task_id: object) -> Job:
        if not isinstance(task_id, str):
            raise ToolError("'task_id' must be a string (the task_id background_run answered)")
        job = self.jobs.get(task_id)
        if job is None:
            raise ToolError(
                f"no background job {task_id!r} in this slot (a reset ends every job, and "
                f"only the latest {MAX_KEPT} finished ones are kept)"
            )
        return job

    def kill(self, job: Job, status: str) -> int:
        """SIGKILL everything of ``job`` until nothing is left; returns how many died.

        Only the job's own process is reaped here: reaping any other child could take the exit
        status of a command being supervised; the others are reaped as orphans are.
        """
        if job.status == RUNNING:
            job.status = status
        me = os.getpid()
        killed: set[int] = set()
        for _ in range(200):
            table = session_table()
            # Once the job's process is reaped its pid may be reused: then its session is not
            # the job's any more, and only what the pid table still links to it is.
            by_session = job.pidfd >= 0 or job.pid not in table
            victims = [
                pid
                for pid, (_, session) in table.items()
                if pid != me and ((by_session and session == job.pid) or descends(pid, job, table))
            ]
            if not victims:
                break
            killed.update(kill_each(victims))
            self.collect(job)
            time.sleep(0.005)
        self.collect(job)
        # What is left in the pipe is the job's; a writer still holding it is not (it left
        # the job's session), and the job is not watched past its end.
        self.drain(job)
        self.close_pipe(job)
        job.deadline = INFINITY
        return len(killed)

    def collect(self, job: Job) -> None:
        """Reap the job's own process if it has ended (none of the others)."""
        if job.pidfd < 0:
            return
        try:
            pid, status = os.waitpid(job.pid, os.WNOHANG)
        except ChildProcessError:
            return  # reaped elsewhere: ``reaped`` has been told
        if pid:
            self.ended(job, os.waitstatus_to_exitcode(status))

    # ---- what the runner calls

    def fileno(self) -> int:
        return self.selector.fileno()

    def service(self) -> None:
        """Read what the jobs wrote and note the ones that ended, without waiting."""
        for key, _ in self.selector.select(0):
            job: Job = key.data
            if key.fd == job.out_r:
                self.read(job)
            elif key.fd == job.pidfd:
                self.collect(job)

    def expire(self, now: float) -> float:
        """Kill the jobs whose timeout has passed; returns the next deadline (inf: none)."""
        upcoming = INFINITY
        for job in list(self.jobs.values()):
            if not job.active:
                continue
            if job.deadline <= now:
                self.kill(job, TIMED_OUT)
                self.forget_old()
            else:
                upcoming = min(upcoming, job.deadline)
        return upcoming

    def spare(self, pids: list[int]) -> list[int]:
        """``pids`` without the processes of the jobs whose own process is not reaped (the
        jobs' sessions: then no other process can have that pid as its session id)."""
        sessions = {job.pid for job in self.jobs.values() if job.pidfd >= 0}
        return [pid for pid in pids if session_of(pid) not in sessions] if sessions else pids

    def reaped(self, info: os.waitid_result) -> None:
        """The runner reaped a child: when it is a job's process, that job has ended."""
        job = self.by_pid.get(info.si_pid)
        if job is not None and job.pidfd >= 0:
            self.ended(job, exit_code_of(info))

    # ---- the idle wait

    def wait_for_request(self, channel_in: int) -> None:
        """Service the jobs until a request can be read from ``channel_in``."""
        if self.idle is None:
            self.idle = selectors.DefaultSelector()
            self.idle.register(channel_in, selectors.EVENT_READ, "request")
            self.idle.register(self.selector.fileno(), selectors.EVENT_READ, "jobs")
            if self.runner.child_exited_r >= 0:
                self.idle.register(self.runner.child_exited_r, selectors.EVENT_READ, "child")
        while True:
            now = time.monotonic()
            upcoming = self.expire(now)
            if upcoming == INFINITY and not self.selector.get_map():
                return  # nothing to watch: the request loop blocks on the channel as before
            wait = None if upcoming == INFINITY else max(0.0, upcoming - now)
            request = False
            for key, _ in self.idle.select(wait):
                if key.data == "request":
                    request = True
                elif key.data == "jobs":
                    self.service()
                else:
                    # Orphans that exited count against RLIMIT_NPROC until reaped; no command
                    # runs now, so every child may be reaped.
                    try:
                        os.read(self.runner.child_exited_r, 4096)
                    except BlockingIOError:
                        pass
                    self.runner.reap()
            if request:
                return

    # ---- the jobs' ends

    def read(self, job: Job) -> None:
        try:
            data = os.read(job.out_r, READ_BYTES)
        except BlockingIOError:
            return
        if data:
            job.output.feed(data)
        else:
            self.close_pipe(job)

    def drain(self, job: Job) -> None:
        """Read what is already in the job's pipe (bounded: a descendant may write on)."""
        drained = 0
        while job.out_r >= 0 and drained < DRAIN_BYTES:
            before = job.output.total
            self.read(job)
            if job.output.total == before:
                return
            drained += job.output.total - before

    def ended(self, job: Job, exit_code: int) -> None:
        """The job's process was reaped: record how it ended and read what it left."""
        self.selector.unregister(job.pidfd)
        os.close(job.pidfd)
        job.pidfd = -1
        job.ended = time.monotonic()
        if job.status == RUNNING:
            job.status = EXITED
            job.exit_code = exit_code
        self.by_pid.pop(job.pid, None)
        self.drain(job)
        self.forget_old()

    def close_pipe(self, job: Job) -> None:
        if job.out_r >= 0:
            self.selector.unregister(job.out_r)
            os.close(job.out_r)
            job.out_r = -1
            job.output.settle()

    def forget_old(self) -> None:
        """Forget the oldest finished jobs beyond ``MAX_KEPT`` (what they left is killed)."""
        finished = [job for job in self.jobs.values() if job.status != RUNNING]
        for job in finished[: max(0, len(finished) - MAX_KEPT)]:
            if job.active:
                self.kill(job, job.status)
            if job.pidfd >= 0:  # not reaped yet (a process stuck in the kernel): stop watching
                self.selector.unregister(job.pidfd)
                os.close(job.pidfd)
                job.pidfd = -1
                self.by_pid.pop(job.pid, None)
            del self.jobs[job.task_id]


def descends(pid: int, job: Job, table: dict[int, tuple[int, int]]) -> bool:
    """Whether ``pid`` is the job's process or descends from it."""
    if job.pidfd < 0:
        return False  # the job's process is gone: its pid may belong to another by now
    node = pid
    for _ in range(len(table) + 1):
        if node == job.pid:
            return True
        entry = table.get(node)
        if entry is None:
            return False
        node = entry[0]
    return False


# ---- the tools


def jobs_of(agent: Agent) -> Jobs:
    if agent.jobs is None:
        agent.jobs = Jobs(agent.runner)
    return agent.jobs


def job_timeout(args: dict[str, Any], bound: float) -> float:
    """The job's timeout: its ``timeout`` argument, at most (and by default) ``bound``."""
    asked = args.get("timeout")
    if asked is None:
        return bound
    if isinstance(asked, bool) or not isinstance(asked, int | float) or not asked > 0:
        raise ToolError("'timeout' must be a positive number of seconds")
    return float(min(asked, bound))  # min first: an int beyond any float is still longer


def background_run(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = command_argument(args)
    job = jobs_of(agent).start(command, job_timeout(args, agent.config.job_timeout_s))
    return {
        "success": True,
        "output": f"started background job {job.task_id}; poll it with check_background",
        "error": "",
        "metadata": {"task_id": job.task_id, "background": True, "timeout_s": job.timeout_s},
    }


def check_background(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    jobs = jobs_of(agent)
    jobs.service()  # what the jobs wrote up to now, and which of them ended
    if args.get("task_id") is None:
        return listing(jobs)
    job = jobs.get(args.get("task_id"))
    since = args.get("since", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ToolError("'since' must be a byte offset: an integer >= 0 (the last 'next')")
    total = job.output.total
    if since > total:
        raise ToolError(f"'since' {since} is beyond the job's output ({total} bytes so far)")
    piece, start = job.output.read(since, agent.config.max_output_bytes, not job.active)
    following = start + len(piece)
    metadata = job.describe()
    metadata.update(
        since=since,
        next=following,
        dropped_bytes=start - since,
        output_dropped_bytes=job.output.dropped,
        more=following < total,
    )
    return {
        "success": True,
        "output": piece.decode("utf-8", "replace"),
        "error": "",
        "metadata": metadata,
    }


def listing(jobs: Jobs) -> dict[str, Any]:
    described = [job.describe() for job in jobs.jobs.values()]
    lines = [
        f"{job['task_id']}  {job['status']:<9}  {job['runtime_s']:>9.1f}s  {job['command']}"
        for job in described
    ]
    return {
        "success": True,
        "output": "\n".join(lines) if lines else "no background jobs",
        "error": "",
        "metadata": {"jobs": described},
    }


def background_kill(agent: Agent, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    jobs = jobs_of(agent)
    jobs.service()
    job = jobs.get(args.get("task_id"))
    was_running = job.status == RUNNING
    killed = jobs.kill(job, KILLED) if job.active else 0
    jobs.forget_old()
    metadata = {**job.describe(), "was_running": was_running, "killed_processes": killed}
    if was_running:
        output = f"killed background job {job.task_id} ({killed} processes)"
    else:
        output = f"background job {job.task_id} had already ended ({job.status})"
        if killed:
            output += f"; {killed} processes it left were killed"
    return {"success": True, "output": output, "error": "", "metadata": metadata}


TOOLS = {
    "background_run": background_run,
    "check_background": check_background,
    "background_kill": background_kill,
}
