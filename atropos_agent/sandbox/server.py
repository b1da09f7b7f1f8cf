"""The sandbox server: the HTTP face of one container (or local child process) with S slots.

Routes are thin: they validate, find the slot, and hand the call to it (``slot.py``); the work
itself happens inside the slot's agent (``agent.py``).
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
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from atropos_agent import __version__
from atropos_agent.models import (
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
)
from atropos_agent.sandbox import agent, uids
from atropos_agent.sandbox.isolation import SlotPaths, probe_bwrap
from atropos_agent.sandbox.protocol import (
    PROTOCOL_VERSION,
    BatchItem,
    SlotArtifactArchiveRequest,
    SlotArtifactListRequest,
    SlotArtifactReadRequest,
    SlotArtifactRequest,
    SlotRequest,
)
from atropos_agent.sandbox.settings import SandboxSettings
from atropos_agent.sandbox.slot import Slot, SlotBusy, wipe_dir
from atropos_agent.sandbox.tools import SANDBOX_TOOLS
from atropos_agent.web import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    error_response,
    install_error_handlers,
)

log = logging.getLogger("atropos.sandbox")

ARTIFACT_TIMEOUT_S = 60.0


def batch_failure(item: BatchItem, exc: Exception) -> dict[str, Any]:
    return {
        "success": False,
        "output": "",
        "error": f"{item.slot_id}: {exc}",
        "execution_id": item.uniq_id,
        "metadata": {"slot_id": item.slot_id},
    }


def check_traversable(path: Path) -> None:
    """Slots run as other uids: every directory above the data dir must let them pass."""
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"data dir {path} is out of reach of the slots' uids: {parent} has mode "
                f"{stat.S_IMODE(parent.stat().st_mode):o}; run `chmod o+x {parent}` or choose "
                "another --data-dir"
            )


class Sandbox:
    """All slots of this server, and the files they share (data dir, agent script)."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.owns_data_dir = settings.data_dir is None
        self.data_dir = Path(
            settings.data_dir or tempfile.mkdtemp(prefix="atropos-sandbox-")
        ).resolve()
        self.agent_file = self.data_dir / "runtime" / "agent.py"
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
        runtime = self.agent_file.parent
        runtime.mkdir(exist_ok=True)
        runtime.chmod(0o755)
        # The agent runs under the slot's own python3 and uid: give it a readable copy.
        shutil.copyfile(agent.__file__, self.agent_file)
        self.agent_file.chmod(0o644)
        self.settings.slot_python()
        if self.settings.isolation == "bwrap":
            probe_dir = self.data_dir / "probe"
            paths = SlotPaths(root=probe_dir, workspace=probe_dir / "w", tmp=probe_dir / "t")
            for directory in (paths.workspace, paths.tmp):
                directory.mkdir(parents=True, exist_ok=True)
            try:
                probe_bwrap(self.settings, self.uid_for(0), paths, self.agent_file)
            finally:
                shutil.rmtree(probe_dir, ignore_errors=True)
        else:
            log.warning(
                "event=isolation_disabled isolation=none message='commands run WITHOUT a sandbox'"
            )
        self.slots = {
            f"slot_{i}": Slot(i, self.uid_for(i), self.settings, self.data_dir, self.agent_file)
            for i in range(self.settings.slots)
        }
        self.prepared = True

    async def start(self) -> None:
        await asyncio.to_thread(self.prepare)
        await asyncio.gather(*(slot.start() for slot in self.slots.values()))
        log.info(
            "event=sandbox_ready slots=%d isolation=%s data_dir=%s",
            len(self.slots),
            self.settings.isolation,
            self.data_dir,
        )

    async def stop(self) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(slot.stop() for slot in self.slots.values()), return_exceptions=True)
        if self.uid_range is not None:
            self.uid_range.release()
        if self.owns_data_dir:
            await asyncio.to_thread(shutil.rmtree, self.data_dir, True)

    def uid_for(self, index: int) -> int | None:
        return self.uid_range.uid(index) if self.uid_range else None

    def slot(self, slot_id: str) -> Slot:
        found = self.slots.get(slot_id)
        if found is None:
            raise HTTPException(
                404,
                f"unknown slot {slot_id!r}: this sandbox has slot_0..slot_{len(self.slots) - 1}",
            )
        return found

    def timeout_for(self, requested: float | None) -> float:
        return min(requested or self.settings.default_timeout_s, self.settings.max_timeout_s)

    def validate(self, items: list[BatchItem]) -> None:
        """Refuse a batch with an unknown slot (404) or tool (400) before any of it runs."""
        problems = []
        for position, item in enumerate(items):
            if item.slot_id not in self.slots:
                raise HTTPException(
                    404,
                    f"item {position}: unknown slot {item.slot_id!r}: this "
                    f"sandbox has slot_0..slot_{len(self.slots) - 1}",
                )
            if item.tool not in SANDBOX_TOOLS:
                problems.append(f"item {position}: unknown tool {item.tool!r}")
        if problems:
            raise HTTPException(
                400, "; ".join(problems) + f" (tools: {', '.join(sorted(SANDBOX_TOOLS))})"
            )

    async def run_batch(
        self,
        items: list[BatchItem],
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run validated items grouped by slot: in order within a slot, slots in parallel.

        ``on_result(position, result)`` is called as each item finishes.
        """
        by_slot: dict[str, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            by_slot[item.slot_id].append(position)
        results: list[dict[str, Any]] = [{} for _ in items]

        async def run_slot(slot_id: str, positions: list[int]) -> None:
            requests = []
            for position in positions:
                item = items[position]
                timeout = self.timeout_for(item.timeout)
                request = {"op": "tool", "tool": item.tool, "args": item.args, "timeout": timeout}
                requests.append((request, timeout))

            def finished(number: int, answer: dict[str, Any]) -> None:
                position = positions[number]
                answer["execution_id"] = items[position].uniq_id
                answer.setdefault("metadata", {})["slot_id"] = slot_id
                results[position] = answer
                if on_result is not None:
                    on_result(position, answer)

            await self.slots[slot_id].call_many(requests, finished)

        if len(by_slot) == 1:
            ((slot_id, positions),) = by_slot.items()
            await run_slot(slot_id, positions)
        else:
            await asyncio.gather(*(run_slot(s, p) for s, p in by_slot.items()))
        return results

    def stream_batch(self, items: list[BatchItem]) -> AsyncIterator[bytes]:
        """NDJSON lines ``{"index": i, ...result}`` in the order items finish.

        The batch runs in a task owned by the sandbox: a caller that goes away stops reading,
        but the calls already handed to slots finish normally (their answers are dropped).
        """
        finished: asyncio.Queue[tuple[int, dict[str, Any]] | None] = asyncio.Queue()
        answered: set[int] = set()

        def on_result(position: int, answer: dict[str, Any]) -> None:
            answered.add(position)
            finished.put_nowait((position, answer))

        async def run() -> None:
            try:
                await self.run_batch(items, on_result)
            except Exception as exc:  # every item gets an answer, whatever went wrong
                for position in range(len(items)):
                    if position not in answered:
                        finished.put_nowait((position, batch_failure(items[position], exc)))
            finally:
                finished.put_nowait(None)

        self.own(asyncio.create_task(run()))

        async def lines() -> AsyncIterator[bytes]:
            while (entry := await finished.get()) is not None:
                position, answer = entry
                yield json.dumps({"index": position, **answer}).encode() + b"\n"

        return lines()

    def own(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def artifact(self, op: str, request: SlotArtifactRequest) -> dict[str, Any]:
        slot = self.slot(request.slot_id)
        fields = request.model_dump(exclude={"slot_id"})
        return await slot.call({"op": op, **fields}, ARTIFACT_TIMEOUT_S)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "slots": len(self.slots),
            "busy_slots": sum(1 for slot in self.slots.values() if slot.busy),
            "isolation": self.settings.isolation,
            "network": self.settings.allow_network,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "uptime_s": round(time.time() - self.started_at, 3),
            "instance_id": self.instance_id,
        }


def create_app(settings: SandboxSettings | None = None) -> FastAPI:
    settings = settings or SandboxSettings()
    sandbox = Sandbox(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(title="atropos sandbox server", version=__version__, lifespan=lifespan)
    app.state.sandbox = sandbox
    install_error_handlers(app)

    @app.exception_handler(SlotBusy)
    async def slot_busy(request: Request, exc: Exception) -> JSONResponse:
        return error_response(503, str(exc), headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return sandbox.health()

    @app.get("/slots")
    async def slots() -> dict[str, Any]:
        return {"slots": [slot.describe() for slot in sandbox.slots.values()]}

    @app.post("/batch")
    async def batch(items: list[BatchItem]) -> JSONResponse:
        sandbox.validate(items)
        return JSONResponse(await sandbox.run_batch(items))

    @app.post("/batch/stream")
    async def batch_stream(items: list[BatchItem]) -> StreamingResponse:
        """Protocol 2: each result as its own NDJSON line as soon as it is ready."""
        sandbox.validate(items)
        return StreamingResponse(sandbox.stream_batch(items), media_type="application/x-ndjson")

    @app.post("/execute")
    async def execute(item: BatchItem) -> JSONResponse:
        sandbox.validate([item])
        return JSONResponse((await sandbox.run_batch([item]))[0])

    @app.post("/reset")
    async def reset(request: SlotRequest) -> dict[str, Any]:
        await sandbox.slot(request.slot_id).reset()
        return {"status": "ok", "slot_id": request.slot_id}

    # Answers take the artifact response shapes, failures included (success false + error).
    @app.post("/artifacts/read")
    async def artifacts_read(request: SlotArtifactReadRequest) -> ArtifactReadResponse:
        answer = await sandbox.artifact("artifact_read", request)
        return ArtifactReadResponse.model_validate(answer)

    @app.post("/artifacts/list")
    async def artifacts_list(request: SlotArtifactListRequest) -> ArtifactListResponse:
        answer = await sandbox.artifact("artifact_list", request)
        return ArtifactListResponse.model_validate(answer)

    @app.post("/artifacts/archive")
    async def artifacts_archive(request: SlotArtifactArchiveRequest) -> ArtifactArchiveResponse:
        answer = await sandbox.artifact("artifact_archive", request)
        return ArtifactArchiveResponse.model_validate(answer)

    token = settings.token.get_secret_value() if settings.token else None
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(BearerAuthMiddleware, token=token, open_paths={"/health"})
    return app
