"""One slot as the sandbox server sees it: its agent process, its queue, its workspace.

Calls to a slot run one at a time in the order received (an ``asyncio.Lock`` is FIFO);
different slots run in parallel. A slot whose agent dies or stops answering is killed whole
(every process in it) and started again on the next call; its workspace files are kept.

A slot's agent runs in one network mode at a time. A call that needs the other mode (its item
said ``allow_network: false`` on a server that allows the network, or the next call did not)
restarts the agent in that mode first: files are kept, its processes end, the result says so.

A cancel stops the call the agent runs now, without waiting for the slot: it is a frame on the
same pipe (``agent/framing.py``), written while the call holds the slot, and read by the agent
in the loop that supervises the running command. Calls queued behind it run as they would.

A slot may have an owner: the lease an executor recorded on it (a batch item's ``lease``, or
``POST /slots/owner``), kept so that an executor started again can learn who held the slot.
The slot only keeps and shows it; a reset clears it.

A slot is *free* from its reset (or the server's start) until it gets an owner or runs a call.
A free slot is *warm* when its agent runs (fresh, on the wiped workspace) and *cold* when it has
none: a reset wipes and stops, and whether the agent starts again before the next call is the
warmer's choice (``warmer.py``), told through ``on_free`` and ``on_taken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from atropos_agent.errors import SandboxStartError, SlotBusy
from atropos_agent.sandbox import mounts
from atropos_agent.sandbox.agent.framing import (
    FRAME_HEADER,
    OP_CANCEL,
    OP_OUTPUT,
    OP_SHUTDOWN,
    OP_WORKSPACE,
    body_length,
    decode_body,
    encode_frame,
)
from atropos_agent.sandbox.agent.results import failure
from atropos_agent.sandbox.isolation import Launch, SlotPaths, disk_config, launch_for
from atropos_agent.sandbox.layered import LayeredWorkspace
from atropos_agent.sandbox.protocol import SlotLease, SlotState
from atropos_agent.sandbox.settings import SandboxSettings

log = logging.getLogger("atropos.sandbox")

AGENT_START_TIMEOUT_S = 20.0
# Time the agent gets beyond a command's own timeout to kill it and answer.
AGENT_GRACE_S = 15.0
# Time an agent gets to clean up after it is asked to stop, before it is killed.
AGENT_STOP_TIMEOUT_S = 3.0
# Longest wait for a cancelled call's answer: a command ends at once, but a call that runs no
# command (an artifact archive) finishes first, and then it was not cancelled.
CANCEL_WAIT_S = 5.0
# An agent entering a workspace made under it answers at once.
ENTER_TIMEOUT_S = 10.0


# Results a slot keeps for calls sent again: an executor restarted mid-call retries its last
# calls, not older ones. A result is at most the output bound (64 KiB by default).
RECENT_RESULTS = 16


class Call(NamedTuple):
    """One request for a slot's agent, the time it may take, the network mode it needs
    (None: whichever mode the agent runs in, as artifact operations), the lease the caller
    holds the slot by (None: the owner stays as it is), the call's id with a digest of what
    it asks (None: never answered from the slot's recent results), where its output goes
    as the command prints it (None: not streamed; ``agent/streaming.py``), and what to do
    once the slot is the call's, just before the request is sent (an upload's body moved
    into the slot's /tmp: ``uploads.py``)."""

    request: dict[str, Any]
    timeout_s: float
    network: bool | None = None
    lease: SlotLease | None = None
    call_id: str | None = None
    digest: int = 0
    on_output: Callable[[dict[str, Any]], None] | None = None
    before_send: Callable[[], None] | None = None


def network_changed(network: bool) -> str:
    """``metadata.slot_restarted`` of a call that switched its slot's network mode."""
    mode = "with network" if network else "without network"
    return (
        f"network mode changed: the slot's agent was restarted {mode}; its processes "
        "(stateful shell, Python interpreter, tmux, background commands) were stopped, "
        "workspace files are kept"
    )


def prepare_dir(path: Path, uid: int | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, 0o700)


def wipe_dir(path: Path, keep: bool = False) -> None:
    """Remove everything below ``path``, including entries a command made unwritable; and
    ``path`` itself unless ``keep`` (a mount point)."""

    def make_writable_and_retry(func: Any, target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    if not path.exists():
        return
    if not keep:
        shutil.rmtree(path, onerror=make_writable_and_retry)
        return
    os.chmod(path, 0o700)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, onerror=make_writable_and_retry)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def kill_uid_processes(uid: int) -> None:
    """Kill every process of a slot's own uid (``none`` mode has no pid namespace to do it)."""
    for _ in range(50):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                owner = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            if owner == uid:
                found = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(name), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.01)


class Slot:
    """One slot: its agent process (inside the slot's isolation), its queue, its directories.

    ``runtime_dir`` holds the agent (``runtime.py``); ``uid`` is the slot's host uid (None:
    the server's own).
    """

    def __init__(
        self,
        index: int,
        uid: int | None,
        settings: SandboxSettings,
        data_dir: Path,
        runtime_dir: Path,
        copy_on_write: bool = False,
        starts: asyncio.Semaphore | None = None,
    ):
        self.index = index
        self.slot_id = f"slot_{index}"
        # The sandbox's gate on agents starting at once (``server.STARTS_PER_CPU``): a burst
        # of calls on cold slots must not starve the server itself (its health checks) of CPU.
        self.starts = starts
        self.settings = settings
        self.runtime_dir = runtime_dir
        root = data_dir / "slots" / self.slot_id
        # ``copy_on_write``: workspaces of layers are overlays (``layered.py``), mounted on the
        # workspace directory, with the slot's own changes shown at ``changes``.
        changes = root / "changes" if copy_on_write else None
        self.paths = SlotPaths(root, root / "workspace", root / "tmp", changes)
        # Copy-on-write: whether the workspace and changes directories are mount points yet.
        self.mount_points = False
        self.uid = uid
        self.lock = asyncio.Lock()
        self.process: asyncio.subprocess.Process | None = None
        self.pending = 0
        self.busy = False
        self.calls = 0
        self.restarts = 0
        self.started_at: float | None = None
        # Set when the agent was lost, so the next call can say its processes are gone.
        self.lost_reason: str | None = None
        # The network mode of the slot's agent: the server's, until a call asks otherwise.
        self.network = settings.allow_network
        # Whether a request is with the agent now (sent, its answer not yet read).
        self.answering = False
        # Made by a cancel, resolved when that answer arrives: whether it says cancelled.
        self.cancel_waiter: asyncio.Future[bool] | None = None
        # The lease an executor recorded on the slot; kept and shown, never acted on.
        self.owner: SlotLease | None = None
        # The latest results by call id, so that a call sent again (its executor restarted
        # while it ran) is answered once more instead of run twice. Reset forgets them.
        self.recent: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        # The workspace's layers (``layered.py``) when it was started on some; None: a plain
        # directory, as every slot has until then.
        self.layered: LayeredWorkspace | None = None
        # ``calls`` when the agent last started: a slot that ran nothing since is fresh.
        self.calls_at_start = 0
        # ``calls`` when the workspace was last wiped: a slot that ran nothing since is free.
        self.calls_at_wipe = 0
        # Told when the slot becomes free (after a reset) and when a free slot is taken (an
        # owner, or its first call): the warmer's cues (``warmer.py``).
        self.on_free: Callable[[Slot], None] | None = None
        self.on_taken: Callable[[Slot], None] | None = None

    # ---- life cycle

    async def start(self, network: bool | None = None) -> None:
        """Start the agent in network mode ``network`` (None: the mode it last ran in)."""
        if network is not None:
            self.network = network
        self.paths.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.paths.root, 0o711)
        if self.layered is None:  # a layered workspace was made by ``use_workspace``
            prepare_dir(self.paths.workspace, self.uid)
        prepare_dir(self.paths.tmp, self.uid)
        if self.paths.changes is not None and not self.mount_points:
            await asyncio.to_thread(self.make_mount_points)
        disk = self.layered.disk() if self.layered is not None else None
        launch = launch_for(
            self.settings, self.uid, self.paths, self.runtime_dir, self.network, disk
        )
        async with self.starts or contextlib.nullcontext():
            await self._spawn_agent(launch)
        self.started_at = time.time()
        self.calls_at_start = self.calls
        log.debug(
            "event=slot_started slot=%s pid=%s network=%s",
            self.slot_id,
            self.process.pid if self.process is not None else None,
            self.network,
        )

    async def _spawn_agent(self, launch: Launch) -> None:
        """Spawn the agent and wait for its ready message (its deadline counts from the
        spawn, not from the wait for a turn at the sandbox's start gate)."""
        self.process = await self._spawn(launch)
        try:
            ready = await asyncio.wait_for(self._receive(), AGENT_START_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            await self._kill()
            raise SandboxStartError(
                f"{self.slot_id}: the slot agent did not start ({type(exc).__name__}); "
                "see the server log for its error output"
            ) from exc
        if not ready.get("ready"):
            await self._kill()
            raise SandboxStartError(f"{self.slot_id}: unexpected first message from agent: {ready}")

    async def _spawn(self, launch: Launch) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=launch.cwd,
            env={},
            start_new_session=True,
            user=launch.uid,
            group=launch.uid,
            extra_groups=[] if launch.uid is not None else None,
            limit=1 << 20,
        )

    async def stop(self) -> None:
        """Ask the agent to kill its processes and exit; kill the slot whole if it lingers."""
        process = self.process
        if process is None:
            return
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._send({"op": OP_SHUTDOWN})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), AGENT_STOP_TIMEOUT_S)
        await self._kill()

    async def _kill(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            # Under bubblewrap, killing the outer process ends the pid namespace and so every
            # process in the slot (--die-with-parent on the namespace's init).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        if self.settings.isolation == "none" and self.uid is not None:
            await asyncio.to_thread(kill_uid_processes, self.uid)

    async def reset(self) -> None:
        """Kill every process of the slot and wipe its workspace and /tmp: the slot is free,
        cold, in the server's network mode. Its agent starts again when the warmer warms it
        or when its next call comes, whichever is first (both under the slot's lock)."""
        async with self.lock:
            self.set_owner(None)
            self.recent.clear()
            await self.stop()
            await self.drop_workspace()
            self.lost_reason = None
            self.network = self.settings.allow_network
            self.calls_at_wipe = self.calls
        if self.on_free is not None:
            self.on_free(self)

    # ---- warm and cold (``warmer.py``)

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def free(self) -> bool:
        """Whether the slot holds nothing of anyone: no owner, no layers, no call since its
        workspace was wiped."""
        return self.owner is None and self.layered is None and self.calls == self.calls_at_wipe

    def warm(self) -> bool:
        """Free, and its agent runs fresh: a first call costs what a later one does."""
        return self.free() and self.fresh()

    def cold(self) -> bool:
        """Free, and no agent: the first call (or the warmer) starts one."""
        return self.free() and not self.alive()

    async def warm_up(self) -> bool:
        """Start the agent of a free slot that has none; False when the slot was taken or
        started meanwhile (a call got its lock first)."""
        async with self.lock:
            if not self.cold():
                return False
            if self.process is not None:  # died while idle
                await self._kill()
            await self.start(self.settings.allow_network)
            return True

    async def cool_down(self) -> bool:
        """Stop the agent of a warm slot (its files were wiped and it ran nothing since);
        False when the slot was taken meanwhile."""
        async with self.lock:
            if not self.warm():
                return False
            await self.stop()
            return True

    # ---- workspaces made of layers (``layered.py``)

    def fresh(self) -> bool:
        """Whether the slot is as a restart would leave it: its agent runs, in the server's
        network mode, on an empty workspace, and ran nothing since it started."""
        return (
            self.layered is None
            and self.process is not None
            and self.process.returncode is None
            and self.calls == self.calls_at_start
            and self.network == self.settings.allow_network
        )

    async def use_workspace(self, layered: LayeredWorkspace | None) -> None:
        """Start the slot anew on ``layered`` (None: an empty workspace), wiping what it held
        as a reset does (its owner is kept: the lease that asked for the workspace).

        A fresh slot (every slot just leased) keeps its agent: the workspace is made under it
        and the agent enters it (``enter_workspace``), a millisecond or two against tens for
        a restart. The slot takes over ``layered``'s hold on its layers, and lets it go
        whatever happens."""
        adopted = False
        try:
            async with self.lock:
                self.recent.clear()
                in_place = layered is not None and self.fresh()
                if not in_place:
                    await self.stop()
                    await self.drop_workspace()
                    self.lost_reason = None
                if layered is not None:
                    try:
                        await asyncio.to_thread(layered.build)
                    except Exception as exc:
                        await asyncio.to_thread(self.wipe_layered, layered)
                        if not in_place:
                            await self.start(self.settings.allow_network)
                        raise SandboxStartError(
                            f"{self.slot_id}: its workspace could not be made of layers "
                            f"{layered.layer_ids}: {exc}; the slot runs on an empty one"
                        ) from exc
                    self.layered, adopted = layered, True
                if in_place:
                    await self.enter_workspace()
                else:
                    await self.start(self.settings.allow_network)
        finally:
            if layered is not None and not adopted:
                layered.release()

    async def enter_workspace(self) -> None:
        """Have the running agent enter the workspace just made under it (an overlay now
        covers /workspace: it is entered again) and count its disk bound as the workspace
        says. An agent that does not see it there is restarted, which always does."""
        assert self.layered is not None
        disk = disk_config(self.settings, self.paths, self.layered.disk())
        answer = await self._run_locked(Call({"op": OP_WORKSPACE, **disk}, ENTER_TIMEOUT_S))
        made = os.stat(self.paths.workspace)
        if answer.get("success") and (answer.get("device"), answer.get("inode")) == (
            made.st_dev,
            made.st_ino,
        ):
            return
        log.warning(
            "event=workspace_not_entered slot=%s answer=%s: restarting the slot's agent",
            self.slot_id,
            answer.get("error") or answer,
        )
        await self._kill()
        await self.start(self.settings.allow_network)

    async def drop_workspace(self) -> None:
        """Wipe the workspace and /tmp of the stopped slot, unmounting layers first."""
        layered, self.layered = self.layered, None
        if layered is not None:
            await asyncio.to_thread(layered.unmount)
            await asyncio.to_thread(self.wipe_layered, layered)
            layered.release()
        await asyncio.to_thread(wipe_dir, self.paths.workspace, self.mount_points)
        await asyncio.to_thread(wipe_dir, self.paths.tmp)

    def wipe_layered(self, layered: LayeredWorkspace) -> None:
        for directory in layered.directories():
            wipe_dir(directory)
        # Emptied, not removed: a fresh slot's running agent is in it.
        wipe_dir(self.paths.workspace, keep=True)

    def make_mount_points(self) -> None:
        """Make the workspace and changes directories mount points whose mounts reach the
        slot's running bubblewrap (``mounts.bind_shared``)."""
        assert self.paths.changes is not None
        self.paths.changes.mkdir(mode=0o755, exist_ok=True)
        mounts.bind_shared(self.paths.workspace)
        mounts.bind_shared(self.paths.changes)
        self.mount_points = True

    def unmount_all(self) -> None:
        """Take every mount of the stopped slot off (worker thread; at the server's stop)."""
        if self.layered is not None:
            self.layered.unmount()
        if self.mount_points and self.paths.changes is not None:
            mounts.unmount(self.paths.changes)
            mounts.unmount(self.paths.workspace)
            self.mount_points = False

    # ---- calls

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        return (await self.call_many([Call(request, timeout_s)]))[0]

    async def call_many(
        self,
        requests: list[Call],
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run calls back to back, holding the slot so no other caller interleaves.

        ``on_result(i, result)`` is called as each one finishes, for streaming answers.
        """
        if self.pending + len(requests) > self.settings.max_pending_per_slot:
            raise SlotBusy(
                f"{self.slot_id} already has {self.pending} calls waiting "
                f"(limit {self.settings.max_pending_per_slot})"
            )
        self.pending += len(requests)
        try:
            async with self.lock:
                self.busy = True
                try:
                    results = []
                    for number, call in enumerate(requests):
                        results.append(await self._call_locked(call))
                        if on_result is not None:
                            on_result(number, results[-1])
                    return results
                finally:
                    self.busy = False
        finally:
            self.pending -= len(requests)

    async def _call_locked(self, call: Call) -> dict[str, Any]:
        if call.lease is not None:
            self.set_owner(call.lease)
        if call.call_id is not None:
            recent = self.recent.get(call.call_id)
            if recent is not None and recent[0] == call.digest:
                answer = dict(recent[1])
                answer["metadata"] = {**(answer.get("metadata") or {}), "replayed": True}
                return answer
        result = await self._run_locked(call)
        if call.call_id is not None and not (result.get("metadata") or {}).get("slot_lost"):
            self.recent[call.call_id] = (call.digest, result)
            self.recent.move_to_end(call.call_id)
            while len(self.recent) > RECENT_RESULTS:
                self.recent.popitem(last=False)
        return result

    async def _run_locked(self, call: Call) -> dict[str, Any]:
        request, timeout_s = call.request, call.timeout_s
        reasons = []
        switch = call.network is not None and call.network != self.network
        if self.process is None or self.process.returncode is not None:
            if self.lost_reason:
                reasons.append(self.lost_reason)
            if self.process is not None:
                await self._kill()
            await self.start(call.network)
            self.lost_reason = None
        elif switch:
            await self.stop()
            await self.start(call.network)
        if switch:
            log.info("event=slot_network_mode slot=%s network=%s", self.slot_id, self.network)
            reasons.append(network_changed(self.network))
        if call.before_send is not None:
            call.before_send()
        if self.calls == self.calls_at_wipe and self.on_taken is not None:
            self.on_taken(self)  # the first call since the wipe: the slot is no longer free
        self.calls += 1
        self.answering = True
        result: dict[str, Any] | None = None
        try:
            await self._send(request if call.on_output is None else {**request, "stream": True})
            result = await asyncio.wait_for(self._answer(call.on_output), timeout_s + AGENT_GRACE_S)
        except asyncio.CancelledError:
            # The caller went away mid-call: the agent's answer would be read as the answer to
            # the next call. Restart the slot rather than let two calls get crossed results.
            await asyncio.shield(self._kill())
            self.lost_reason = "an earlier call was abandoned by its caller"
            raise
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            reason = (
                "stopped answering"
                if isinstance(exc, TimeoutError)
                else "sent a malformed answer"
                if isinstance(exc, ValueError)
                else "died"
            )
            log.warning("event=agent_lost slot=%s reason=%s", self.slot_id, reason)
            await self._kill()
            self.restarts += 1
            self.lost_reason = f"the slot's agent {reason} during an earlier call"
            return failure(
                f"{self.slot_id}: the slot's agent {reason} during this call (a command may "
                "have killed it); every process of the slot was stopped, workspace files "
                "are kept, and the next call starts the slot again",
                slot_lost=True,
            )
        finally:
            self.answering = False
            waiter, self.cancel_waiter = self.cancel_waiter, None
            if waiter is not None and not waiter.done():
                metadata = (result or {}).get("metadata") or {}
                waiter.set_result(bool(metadata.get("cancelled")))
        if reasons:
            result.setdefault("metadata", {})["slot_restarted"] = "; ".join(reasons)
        return result

    async def cancel(self) -> bool:
        """Stop the call the agent runs now (not those queued behind it); True when it was
        stopped, as its answer says. Idle, or the call ends first: False."""
        if not self.answering or self.process is None or self.process.returncode is not None:
            return False
        if self.cancel_waiter is None:  # made here, not per call: the hot path stays bare
            self.cancel_waiter = asyncio.get_running_loop().create_future()
        waiter = self.cancel_waiter
        # Not under ``self.lock``: the running call holds it. Frames cannot interleave all the
        # same: ``_send`` hands a whole frame to the pipe's transport in one synchronous write.
        with contextlib.suppress(ConnectionError):
            await self._send({"op": OP_CANCEL})
        try:
            stopped = await asyncio.wait_for(asyncio.shield(waiter), CANCEL_WAIT_S)
        except TimeoutError:
            stopped = False
        log.info("event=slot_cancel slot=%s cancelled=%s", self.slot_id, stopped)
        return stopped

    def set_owner(self, lease: SlotLease | None) -> None:
        """Record who holds the slot (None: nobody). On the hot path (a call that carries its
        lease) this is one comparison: the owner rarely changes."""
        if lease != self.owner:
            if lease is not None and self.on_taken is not None and self.free():
                self.on_taken(self)
            self.owner = lease
            log.info(
                "event=slot_owner slot=%s trajectory=%s",
                self.slot_id,
                lease.trajectory_id if lease else None,
            )

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        frame = encode_frame(message)
        self.process.stdin.write(frame)
        # Small frames fit the pipe: waiting for the drain would cost a loop turn per call.
        if len(frame) > 65536:
            await self.process.stdin.drain()

    async def _answer(self, on_output: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """The agent's answer to the request sent; a streamed call's output frames before it
        go to ``on_output``."""
        while True:
            frame = await self._receive()
            if frame.get("op") != OP_OUTPUT:
                return frame
            if on_output is not None:
                on_output(frame)

    async def _receive(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        header = await self.process.stdout.readexactly(FRAME_HEADER.size)
        body = await self.process.stdout.readexactly(body_length(header))
        return decode_body(body)

    def describe(self) -> SlotState:
        return SlotState(
            slot_id=self.slot_id,
            busy=self.busy,
            pending=self.pending,
            calls=self.calls,
            restarts=self.restarts,
            pid=self.process.pid if self.process else None,
            alive=self.process is not None and self.process.returncode is None,
            started_at=self.started_at,
            network=self.network,
            owner=self.owner,
            warm=self.warm(),
        )
