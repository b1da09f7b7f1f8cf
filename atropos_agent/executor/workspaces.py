"""Workspaces as a trainer shapes them: uploads, templates, forks and diffs.

Each operation runs in order with the trajectory's calls (``Executor.leased``): an upload
takes the trajectory's lease when it holds none (from a template, if one is named), the others
need a lease. What a workspace is made of in a sandbox (layers) and how they get there is
``shipping.py``; templates on disk are ``templates.py``. docs/executor.md, "Preparing once,
running many".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator

from atropos_agent.errors import ArchiveRefused, SandboxUnavailable, WorkspaceConflict
from atropos_agent.executor.executor import Executor
from atropos_agent.executor.leases import Lease, PoolSandbox
from atropos_agent.executor.shipping import Shipping, require_workspaces
from atropos_agent.executor.templates import Template, TemplateRegistry
from atropos_agent.executor.trajectories import Trajectory
from atropos_agent.models import (
    DiffResponse,
    ForkedTrajectory,
    ForkRequest,
    ForkResponse,
    LeaseOptions,
    TemplateInfo,
    UploadResponse,
)

log = logging.getLogger("atropos.executor.workspaces")


def decoded(content: str, what: str) -> bytes:
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise ArchiveRefused(f"{what} is not valid base64") from None


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Reading:
    """A body forwarded as it is read, remembering why reading it failed: the transport to
    the sandbox reports that as its own failure."""

    def __init__(self, body: bytes | AsyncIterable[bytes]) -> None:
        self.body = body
        self.streamed = not isinstance(body, bytes)
        self.failure: Exception | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        assert not isinstance(self.body, bytes)
        try:
            async for chunk in self.body:
                yield chunk
        except Exception as exc:
            self.failure = exc
            raise


class Workspaces:
    def __init__(self, executor: Executor, shipping: Shipping) -> None:
        self.executor = executor
        self.shipping = shipping

    @property
    def registry(self) -> TemplateRegistry:
        return self.shipping.registry

    # ---- uploads

    async def upload(
        self,
        trajectory_id: str,
        path: str,
        format: str,
        body: bytes | AsyncIterable[bytes],
        options: LeaseOptions,
    ) -> UploadResponse:
        """The archive (or file) into the trajectory's workspace at ``path``: ``TooLarge``
        over a cap, ``ArchiveRefused`` for what a workspace may not hold (nothing written)."""
        reading = Reading(body)
        async with self.executor.leased(trajectory_id, options) as lease:
            require_workspaces(lease.sandbox)
            try:
                answer = await lease.sandbox.client.upload_archive(
                    lease.slot_id, path, format, reading.chunks() if reading.streamed else body
                )
            except SandboxUnavailable:
                # The trainer's body failed as it was read (over the cap: 413), not the sandbox.
                if reading.failure is not None:
                    raise reading.failure from None
                raise
        if not answer.success:
            raise ArchiveRefused(f"upload into trajectory {trajectory_id!r}: {answer.error}")
        return answer

    # ---- templates

    async def create_template(self, name: str, chunks: AsyncIterable[bytes]) -> TemplateInfo:
        return (await self.registry.add(name, chunks)).info()

    async def template_of(self, name: str, trajectory_id: str) -> TemplateInfo:
        """A template of the files in a live trajectory's workspace now."""
        async with self.executor.leased(trajectory_id) as lease:
            require_workspaces(lease.sandbox)
            async with lease.sandbox.client.export_slot(lease.slot_id) as chunks:
                template = await self.registry.add(name, chunks)
        return template.info()

    def list_templates(self) -> list[TemplateInfo]:
        return [template.info() for template in self.registry.list()]

    def delete_template(self, name: str) -> None:
        """The name goes now; its content goes from sandboxes once no workspace uses it
        (a running trajectory made from it keeps its files)."""
        template, content_gone = self.registry.remove(name)
        if content_gone:
            self.shipping.forget_layer(template.layer_id)
            for sandbox in list(self.executor.pool.sandboxes.values()):
                self.executor.pool.own(
                    drop_layer(sandbox, template), f"drop-layer-{sandbox.sandbox_id}"
                )

    # ---- forks and diffs

    async def fork(self, request: ForkRequest) -> ForkResponse:
        """New trajectories whose workspaces start as the source's files now (not its
        processes). Each new id must hold no lease (``WorkspaceConflict``); on any failure
        every lease taken here goes back."""
        executor = self.executor
        for new_id in request.new_trajectory_ids:
            self._check_free(new_id)
        async with executor.leased(request.trajectory_id) as source:
            require_workspaces(source.sandbox)
            source_trajectory = executor.trajectories[request.trajectory_id]
            options = LeaseOptions(
                group=request.group or source_trajectory.group, lease_ttl_s=request.lease_ttl_s
            )
            made = [executor.trajectory(new_id, options) for new_id in request.new_trajectory_ids]
            try:
                async with contextlib.AsyncExitStack() as locks:
                    for trajectory in made:
                        await locks.enter_async_context(trajectory.lock)
                    for trajectory in made:  # a call may have taken a lease meanwhile
                        self._check_free(trajectory.trajectory_id)
                    leases = await self._fork_leases(source, made)
                    for trajectory, lease in zip(made, leases, strict=True):
                        executor.hold(trajectory, lease)
                        trajectory.last_used = source_trajectory.last_used
            finally:
                for trajectory in made:  # those left without a lease were made for nothing
                    unused = trajectory.lease is None and not trajectory.in_flight
                    if unused and executor.trajectories.get(trajectory.trajectory_id) is trajectory:
                        del executor.trajectories[trajectory.trajectory_id]
        log.info(
            "event=forked trajectory=%s forks=%d sandboxes=%d",
            request.trajectory_id,
            len(leases),
            len({lease.sandbox.sandbox_id for lease in leases}),
        )
        return ForkResponse(
            trajectory_id=request.trajectory_id,
            forks=[
                ForkedTrajectory(
                    trajectory_id=lease.trajectory_id,
                    sandbox_id=lease.sandbox.sandbox_id,
                    slot_id=lease.slot_id,
                )
                for lease in leases
            ],
        )

    def _check_free(self, trajectory_id: str) -> None:
        known = self.executor.trajectories.get(trajectory_id)
        if known is not None and known.lease is not None:
            raise WorkspaceConflict(
                f"trajectory {trajectory_id!r} already holds a lease: a fork needs new "
                "trajectory ids (release it first to reuse the id)"
            )
        if trajectory_id in self.executor.ended:
            raise WorkspaceConflict(
                f"trajectory {trajectory_id!r} held a lease that ended and was not released: "
                "release it first to reuse the id"
            )

    async def _fork_leases(self, source: Lease, made: list[Trajectory]) -> list[Lease]:
        """A slot for each new trajectory, beside the source's when there is room, each
        started on the source's files; all of them back to the pool on any failure."""
        pool = self.executor.pool
        timeout_s = self.executor.settings.acquire_timeout_s
        taken = await asyncio.gather(
            *(pool.acquire(t.trajectory_id, timeout_s, prefer=source.sandbox) for t in made),
            return_exceptions=True,
        )
        leases = [lease for lease in taken if isinstance(lease, Lease)]
        try:
            failed = next((e for e in taken if isinstance(e, BaseException)), None)
            if failed is not None:
                raise failed
            await self._start_forks(source, leases)
        except BaseException:
            for lease in leases:
                pool.release(lease)
            raise
        return leases

    async def _start_forks(self, source: Lease, leases: list[Lease]) -> None:
        """One snapshot of the source, its slots beside it started there; those on other
        sandboxes started on the same layers, sent from the source's sandbox."""
        beside = [lease for lease in leases if lease.sandbox is source.sandbox]
        elsewhere = [lease for lease in leases if lease.sandbox is not source.sandbox]
        for lease in elsewhere:
            require_workspaces(lease.sandbox)
        layers = await source.sandbox.client.fork_slot(
            source.slot_id, [lease.slot_id for lease in beside]
        )
        await asyncio.gather(
            *(self.shipping.start(lease, layers, origin=source.sandbox) for lease in elsewhere)
        )
        for lease in leases:
            lease.forked_from = source.trajectory_id
            lease.layers = tuple(layers)

    async def diff(self, trajectory_id: str) -> DiffResponse:
        """The files added or changed since the workspace's template or fork source (all of
        them for a workspace that started empty), and the paths deleted."""
        async with self.executor.leased(trajectory_id) as lease:
            require_workspaces(lease.sandbox)
            return await lease.sandbox.client.diff_slot(lease.slot_id)


async def drop_layer(sandbox: PoolSandbox, template: Template) -> None:
    """Best effort: a sandbox that keeps the layer evicts it when its store is full."""
    try:
        await sandbox.client.delete_layer(template.layer_id)
    except SandboxUnavailable as exc:
        log.warning(
            "event=layer_not_dropped sandbox=%s layer=%s error=%s",
            sandbox.sandbox_id,
            template.layer_id,
            exc.message,
        )
