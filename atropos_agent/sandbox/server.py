"""The sandbox: all slots of one sandbox server, and what a request asks of them.

Admission (each item of a batch checked alone: one that cannot run gets its failed result,
every other item runs), batches run per slot (in order within a slot, slots in parallel),
streamed answers, and the descriptions ``/health`` and ``/slots`` give. The routes
(``app.py``) only hand requests to it; each call's work happens in its slot (``slot.py``)
and that slot's agent (``agent/``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from atropos_agent import __version__
from atropos_agent.errors import SandboxStartError, UnknownSlot
from atropos_agent.models import UploadResponse
from atropos_agent.sandbox import uids
from atropos_agent.sandbox.agent.framing import OP_TOOL
from atropos_agent.sandbox.agent.results import failure
from atropos_agent.sandbox.isolation import SlotPaths, probe_bwrap
from atropos_agent.sandbox.metrics import SandboxMetrics, SlotsState
from atropos_agent.sandbox.protocol import (
    PROTOCOL_VERSION,
    BatchItem,
    BatchResult,
    SandboxHealth,
    SlotArtifactRequest,
    SlotLease,
    SlotsResponse,
    SlotState,
    StreamedResult,
    UploadFormat,
)
from atropos_agent.sandbox.runtime import install_runtime
from atropos_agent.sandbox.settings import SandboxSettings
from atropos_agent.sandbox.slot import Call, Slot, wipe_dir
from atropos_agent.sandbox.tools import SANDBOX_TOOLS
from atropos_agent.sandbox.uploads import Uploads
from atropos_agent.sandbox.warmer import Warmer
from atropos_agent.sandbox.workspaces import Workspaces
from atropos_agent.web import SafeJsonAdapter

log = logging.getLogger("atropos.sandbox")

ARTIFACT_TIMEOUT_S = 60.0
# Results leave as JSON bytes serialised by pydantic-core: no second validation on the way out,
# and text UTF-8 cannot hold sent as U+FFFD rather than failing (a result is never lost).
RESULTS: SafeJsonAdapter[list[BatchResult]] = SafeJsonAdapter(list[BatchResult])
RESULT: SafeJsonAdapter[BatchResult] = SafeJsonAdapter(BatchResult)
STREAMED: SafeJsonAdapter[StreamedResult] = SafeJsonAdapter(StreamedResult)
ITEMS = TypeAdapter(list[BatchItem])
# Slot agents starting at once, per core, whoever starts them (the warmer, calls on cold
# slots): more only queue for the CPU, and a burst of a hundred starts would leave the server
# no CPU to answer its health checks (its executor would take it for dead).
STARTS_PER_CPU = 2
# An admitted batch entry: a call to run, or the failed result of an item that cannot run.
Admitted = BatchItem | BatchResult


def call_key(item: BatchItem) -> tuple[str | None, int]:
    """The item's call id and a digest of what it asks (a hash this process computes for
    both): a call sent again under the same id and asking the same is answered from the
    slot's recent results (``slot.Slot.recent``); an id reused for another call runs it."""
    if item.uniq_id is None:
        return None, 0
    return item.uniq_id, hash(repr((item.tool, item.args, item.timeout)))


def batch_result(item: BatchItem, answer: dict[str, Any]) -> BatchResult:
    """An agent's answer to ``item``, with the call's id and its slot."""
    metadata = answer.get("metadata") or {}
    metadata["slot_id"] = item.slot_id
    return BatchResult(
        success=answer["success"],
        output=answer.get("output", ""),
        error=answer.get("error", ""),
        uniq_id=item.uniq_id,
        metadata=metadata,
    )


def refused(message: str, uniq_id: Any, slot_id: str | None) -> BatchResult:
    """The result of an item that cannot run: its id echoed, and its slot when it is one of
    this sandbox's (``slot_id`` None otherwise)."""
    answer = failure(message, **({} if slot_id is None else {"slot_id": slot_id}))
    return BatchResult(
        success=False,
        error=answer["error"],
        uniq_id=uniq_id if isinstance(uniq_id, str) else None,
        metadata=answer["metadata"],
    )


def invalid_fields(exc: ValidationError) -> str:
    """``timeout: Input should be greater than 0 (got -1); tool: Field required``."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "item"
        value = error.get("input")
        shown = ""
        if error["type"] != "missing" and not isinstance(value, dict):
            text = repr(value)
            shown = f" (got {text if len(text) <= 80 else text[:77] + '...'})"
        problems.append(f"{where}: {error['msg']}{shown}")
    return "; ".join(problems)


def check_traversable(path: Path) -> None:
    """Slots run as other uids: every directory above the data dir must let them pass."""
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise SandboxStartError(
                f"data dir {path} is out of reach of the slots' uids: {parent} has mode "
                f"{stat.S_IMODE(parent.stat().st_mode):o}; run `chmod o+x {parent}` or choose "
                "another --data-dir"
            )


class Sandbox:
    """All slots of this server, and the files they share (data dir, agent runtime)."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.owns_data_dir = settings.data_dir is None
        self.data_dir = Path(
            settings.data_dir or tempfile.mkdtemp(prefix="atropos-sandbox-")
        ).resolve()
        self.runtime_dir = self.data_dir / "runtime"
        self.slots: dict[str, Slot] = {}
        # Host uids of the slots (claimed when running as root; None: the server's own uid).
        self.uid_range: uids.UidRange | None = None
        self.prepared = False
        self.started_at = time.time()
        # New at every start: a restarted server at the same address is a different sandbox
        # (its workspaces are gone), and the executor must be able to tell.
        self.instance_id = uuid.uuid4().hex
        # Batches still running after their caller left: awaited on shutdown.
        self.tasks: set[asyncio.Task[None]] = set()
        # Upload bodies on their way into slots (PUT /slots/{id}/archive).
        self.uploads = Uploads(self.data_dir / "uploads", settings)
        # Workspaces made of layers: templates, forks, diffs (protocol 5).
        self.workspaces = Workspaces(settings, self.data_dir)
        self.metrics = SandboxMetrics(settings.isolation)
        self.metrics.watch(self.slots_state)
        # Keeps ``warm_target`` free slots' agents started (made with the slots).
        self.warmer: Warmer | None = None

    # ---- life cycle

    def prepare(self) -> None:
        """Lay out the data dir and check isolation works; raises with a fix when it does not."""
        if self.prepared:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o711)
        if os.geteuid() == 0:
            # Allocations of one Nomad job on one client are separate containers that cannot
            # see each other's claims: their allocation index keeps their ranges apart.
            alloc_index = int(os.environ.get("NOMAD_ALLOC_INDEX", "0") or 0)
            preferred = self.settings.slot_uid_base + alloc_index * self.settings.slots
            self.uid_range = uids.claim(preferred, self.settings.slots)
            check_traversable(self.data_dir)
        # Workspaces left by an earlier run of this server belong to leases that are gone.
        wipe_dir(self.data_dir / "slots")
        (self.data_dir / "slots").mkdir()
        (self.data_dir / "slots").chmod(0o711)
        self.uploads.prepare()
        install_runtime(self.runtime_dir, self.settings.slot_python())
        if self.settings.isolation == "bwrap":
            probe_dir = self.data_dir / "probe"
            paths = SlotPaths(root=probe_dir, workspace=probe_dir / "w", tmp=probe_dir / "t")
            for directory in (paths.workspace, paths.tmp):
                directory.mkdir(parents=True, exist_ok=True)
            try:
                probe_bwrap(self.settings, self.uid_for(0), paths, self.runtime_dir)
            finally:
                shutil.rmtree(probe_dir, ignore_errors=True)
        else:
            log.warning(
                "event=isolation_disabled isolation=none message='commands run WITHOUT a sandbox'"
            )
        self.workspaces.prepare(self.uid_for(0))
        copy_on_write = self.workspaces.mode == "overlay"
        starts = asyncio.Semaphore(max(1, (os.cpu_count() or 1) * STARTS_PER_CPU))
        self.slots = {
            f"slot_{i}": Slot(
                i,
                self.uid_for(i),
                self.settings,
                self.data_dir,
                self.runtime_dir,
                copy_on_write,
                starts,
            )
            for i in range(self.settings.slots)
        }
        self.warmer = Warmer(list(self.slots.values()), self.settings.warm_target)
        self.prepared = True

    async def start(self) -> None:
        """Ready once the data dir is laid out and isolation is known to work: slots' agents
        start in the background (``warmer.py``), or on their first call."""
        await asyncio.to_thread(self.prepare)
        assert self.warmer is not None
        self.warmer.start()
        log.info(
            "event=sandbox_ready slots=%d warm_target=%d isolation=%s data_dir=%s",
            len(self.slots),
            self.settings.warm_target,
            self.settings.isolation,
            self.data_dir,
        )

    async def stop(self) -> None:
        if self.warmer is not None:
            await self.warmer.stop()
        # Calls still running had their grace from the HTTP server's own shutdown; their
        # slots are stopping now, so they end with them.
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(slot.stop() for slot in self.slots.values()), return_exceptions=True)
        # The mounts die with this process's namespace; unmounted first all the same, so that
        # removing the data dir below never walks into a layer.
        await asyncio.to_thread(self.workspaces.unmount_all, list(self.slots.values()))
        await self.workspaces.close()
        if self.uid_range is not None:
            self.uid_range.release()
        if self.owns_data_dir:
            await asyncio.to_thread(shutil.rmtree, self.data_dir, True)

    def uid_for(self, index: int) -> int | None:
        return self.uid_range.uid(index) if self.uid_range else None

    # ---- requests

    def slot(self, slot_id: str) -> Slot:
        """The slot for /reset, /cancel, /slots/owner and /artifacts/*; an unknown one is a
        404 there."""
        found = self.slots.get(slot_id)
        if found is None:
            last = len(self.slots) - 1
            raise UnknownSlot(f"unknown slot {slot_id!r}: this sandbox has slot_0..slot_{last}")
        return found

    def timeout_for(self, requested: float | None) -> float:
        return min(requested or self.settings.default_timeout_s, self.settings.max_timeout_s)

    def admit(self, entries: list[dict[str, Any]]) -> list[Admitted]:
        """Each item of a batch (decoded JSON objects) as a call to run, or, when it cannot
        run (unknown slot or tool, an invalid field), its failed result: one bad item never
        refuses the others."""
        try:
            items: list[BatchItem] = ITEMS.validate_python(entries)  # every item well-formed
        except ValidationError:
            return [self.admit_one(entry) for entry in entries]
        return [self.check(item) or item for item in items]

    def admit_one(self, entry: dict[str, Any]) -> Admitted:
        try:
            item = BatchItem.model_validate(entry)
        except ValidationError as exc:
            uniq_id = entry.get("execution_id", entry.get("uniq_id"))
            slot_id = entry.get("slot_id")
            known = slot_id if isinstance(slot_id, str) and slot_id in self.slots else None
            return refused(f"Invalid item: {invalid_fields(exc)}", uniq_id, known)
        return self.check(item) or item

    def check(self, item: BatchItem) -> BatchResult | None:
        """The failed result of a well-formed item that cannot run here; None when it can."""
        if item.slot_id not in self.slots:
            last = len(self.slots) - 1
            message = f"Unknown slot: {item.slot_id} (this sandbox has slot_0..slot_{last})"
            return refused(message, item.uniq_id, None)
        if item.tool not in SANDBOX_TOOLS:
            message = f"Unknown tool: {item.tool} (tools: {', '.join(sorted(SANDBOX_TOOLS))})"
            return refused(message, item.uniq_id, item.slot_id)
        wanted = item.args.get("allow_network")
        if wanted is None:
            return None
        if not isinstance(wanted, bool):
            message = f"Invalid item: args.allow_network must be true or false (got {wanted!r})"
            return refused(message, item.uniq_id, item.slot_id)
        if not wanted and self.settings.isolation != "bwrap":
            message = (
                "network isolation needs bubblewrap: this sandbox runs with --isolation none "
                "(no network namespace), so a call with allow_network false is not run"
            )
            return refused(message, item.uniq_id, item.slot_id)
        return None

    def network_for(self, item: BatchItem) -> bool:
        """The network mode ``item`` runs in: an item can narrow the server's, never widen it."""
        return self.settings.allow_network and item.args.get("allow_network") is not False

    async def run_batch(
        self,
        entries: list[Admitted],
        on_result: Callable[[int, BatchResult], None] | None = None,
    ) -> list[BatchResult]:
        """Run admitted items grouped by slot: in order within a slot, slots in parallel.

        ``on_result(position, result)`` is called as each item finishes (at once for items
        that were refused).
        """
        by_slot: dict[str, list[int]] = defaultdict(list)
        results: list[BatchResult | None] = [None] * len(entries)
        items: list[BatchItem | None] = [None] * len(entries)
        for position, entry in enumerate(entries):
            if isinstance(entry, BatchItem):
                items[position] = entry
                by_slot[entry.slot_id].append(position)
            else:
                results[position] = entry
                self.metrics.call_refused()
                if on_result is not None:
                    on_result(position, entry)

        async def run_slot(slot_id: str, positions: list[int]) -> None:
            calls = []
            for position in positions:
                item = items[position]
                assert item is not None
                calls.append(self.call_for(item))

            def finished(number: int, answer: dict[str, Any]) -> None:
                position = positions[number]
                item = items[position]
                assert item is not None
                self.metrics.call_answered(item.tool, answer)
                result = results[position] = batch_result(item, answer)
                if on_result is not None:
                    on_result(position, result)

            await self.slots[slot_id].call_many(calls, finished)

        if len(by_slot) == 1:
            ((slot_id, positions),) = by_slot.items()
            await run_slot(slot_id, positions)
        elif by_slot:
            await asyncio.gather(*(run_slot(s, p) for s, p in by_slot.items()))
        return [result for result in results if result is not None]

    def stream_batch(self, items: list[Admitted]) -> AsyncIterator[bytes]:
        """NDJSON lines (``StreamedResult``: ``{"index": i, ...result}``) as items finish.

        The batch runs in a task owned by the sandbox: a caller that goes away stops reading,
        but the calls already handed to slots finish normally (their answers are dropped).
        """
        finished: asyncio.Queue[tuple[int, BatchResult] | None] = asyncio.Queue()
        answered: set[int] = set()

        def on_result(position: int, result: BatchResult) -> None:
            answered.add(position)
            finished.put_nowait((position, result))

        async def run() -> None:
            try:
                await self.run_batch(items, on_result)
            except Exception as exc:  # every item gets an answer, whatever went wrong
                for position, item in enumerate(items):
                    if position not in answered and isinstance(item, BatchItem):
                        answer = failure(f"{item.slot_id}: {exc}")
                        self.metrics.call_answered(item.tool, answer)
                        finished.put_nowait((position, batch_result(item, answer)))
            finally:
                finished.put_nowait(None)

        self.own(asyncio.create_task(run()))

        async def lines() -> AsyncIterator[bytes]:
            while (entry := await finished.get()) is not None:
                position, result = entry
                line = StreamedResult(index=position, **dict(result))
                yield STREAMED.dump_json(line) + b"\n"

        return lines()

    def call_for(
        self, item: BatchItem, on_output: Callable[[dict[str, Any]], None] | None = None
    ) -> Call:
        """The slot call that runs ``item``."""
        timeout = self.timeout_for(item.timeout)
        request = {"op": OP_TOOL, "tool": item.tool, "args": item.args, "timeout": timeout}
        network = self.network_for(item)
        return Call(request, timeout, network, item.lease, *call_key(item), on_output)

    def stream_call(self, entry: Admitted) -> AsyncIterator[bytes]:
        """Protocol 4: one call as NDJSON events: ``{"type": "output", "stream", "data"}`` as
        its command prints, then ``{"type": "result", ...its result}``.

        The call runs in a task owned by the sandbox, as a batch's do: a caller that goes away
        stops reading, and cancels the command with ``POST /cancel`` if it wants it stopped.
        """
        events: asyncio.Queue[bytes | None] = asyncio.Queue()

        def on_output(frame: dict[str, Any]) -> None:
            event = {"type": "output", "stream": frame.get("stream"), "data": frame.get("data")}
            events.put_nowait(json.dumps(event).encode() + b"\n")

        def on_result(result: BatchResult) -> None:
            # The result's own JSON (safely encoded) with the event type in front.
            events.put_nowait(b'{"type":"result",' + RESULT.dump_json(result)[1:] + b"\n")

        async def run(item: BatchItem) -> None:
            try:
                answers = await self.slots[item.slot_id].call_many([self.call_for(item, on_output)])
                self.metrics.call_answered(item.tool, answers[0])
                on_result(batch_result(item, answers[0]))
            except Exception as exc:  # the call gets an answer, whatever went wrong
                answer = failure(f"{item.slot_id}: {exc}")
                self.metrics.call_answered(item.tool, answer)
                on_result(batch_result(item, answer))
            finally:
                events.put_nowait(None)

        if isinstance(entry, BatchItem):
            self.own(asyncio.create_task(run(entry)))
        else:
            self.metrics.call_refused()
            on_result(entry)
            events.put_nowait(None)

        async def lines() -> AsyncIterator[bytes]:
            while (line := await events.get()) is not None:
                yield line

        return lines()

    def own(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def artifact(self, op: str, request: SlotArtifactRequest) -> dict[str, Any]:
        """An artifact operation (``agent/framing.py``: ``OP_ARTIFACT_*``) in its slot."""
        slot = self.slot(request.slot_id)
        fields = request.model_dump(exclude={"slot_id"})
        return await slot.call({"op": op, **fields}, ARTIFACT_TIMEOUT_S)

    async def upload(
        self, slot_id: str, body: AsyncIterator[bytes], path: str, archive_format: UploadFormat
    ) -> tuple[UploadResponse, bool]:
        """An upload into ``slot_id``'s workspace (``uploads.py``); the answer, and whether
        it is over a cap. An unknown slot is refused before the body is read."""
        return await self.uploads.extract(self.slot(slot_id), body, path, archive_format)

    async def cancel(self, slot_id: str) -> bool:
        """Stop the call ``slot_id`` runs now; True when one ran and was stopped."""
        return await self.slot(slot_id).cancel()

    def set_owner(self, slot_id: str, lease: SlotLease | None) -> SlotState:
        """Record ``lease`` as the slot's owner without running anything; the slot's state."""
        slot = self.slot(slot_id)
        slot.set_owner(lease)
        return slot.describe()

    # ---- descriptions

    def health(self) -> SandboxHealth:
        readiness = self.warmer.counts() if self.warmer is not None else {}
        return SandboxHealth(
            status="ok",
            slots=len(self.slots),
            busy_slots=sum(1 for slot in self.slots.values() if slot.busy),
            isolation=self.settings.isolation,
            network=self.settings.allow_network,
            version=__version__,
            protocol_version=PROTOCOL_VERSION,
            uptime_s=round(time.time() - self.started_at, 3),
            instance_id=self.instance_id,
            workspace_layers=self.workspaces.mode if self.prepared else None,
            warm_slots=readiness.get("warm"),
            cold_slots=readiness.get("cold"),
            leased_slots=readiness.get("leased"),
            warm_target=self.settings.warm_target,
        )

    def describe_slots(self) -> SlotsResponse:
        return SlotsResponse(slots=[slot.describe() for slot in self.slots.values()])

    def slots_state(self) -> SlotsState:
        """What the gauges of a scrape show (``metrics.SlotCollector``)."""
        states = {"busy": 0, "idle": 0, "down": 0}
        for slot in self.slots.values():
            alive = slot.process is not None and slot.process.returncode is None
            states["busy" if slot.busy else "idle" if alive else "down"] += 1
        return SlotsState(
            by_state=states,
            readiness=self.warmer.counts() if self.warmer is not None else {},
            pending=sum(slot.pending for slot in self.slots.values()),
            restarts=sum(slot.restarts for slot in self.slots.values()),
        )
