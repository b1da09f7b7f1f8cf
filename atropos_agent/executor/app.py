"""The executor service's HTTP routes (docs/protocol.md). Routes only: the work is in executor/.

``atropos_agent.executor.app:app`` reads its settings from the environment;
``create_app(settings)`` builds one with explicit settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from atropos_agent import __version__
from atropos_agent.executor.backends import create_backend
from atropos_agent.executor.backends.base import BackendError
from atropos_agent.executor.executor import (
    Executor,
    QueueFull,
    TrajectoryBusy,
    UnknownTrajectory,
)
from atropos_agent.executor.external_tools import ExternalTools
from atropos_agent.executor.pool import Pool
from atropos_agent.executor.settings import ExecutorSettings
from atropos_agent.models import (
    ArtifactArchiveRequest,
    ArtifactArchiveResponse,
    ArtifactListRequest,
    ArtifactListResponse,
    ArtifactReadRequest,
    ArtifactReadResponse,
    ExecuteBatchRequest,
    ExecuteBatchResponse,
    ExecuteRequest,
    ReleaseRequest,
    ToolResult,
)
from atropos_agent.sandbox.tools import SANDBOX_TOOL_SCHEMAS
from atropos_agent.web import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    error_response,
    install_error_handlers,
)

log = logging.getLogger("atropos.api")

SERVICE_NAME = "Atropos tool executor"


def build_executor(settings: ExecutorSettings) -> Executor:
    token = settings.tool_server_token.get_secret_value() if settings.tool_server_token else None
    external = ExternalTools(settings.tool_server_url, token)
    return Executor(settings, Pool(settings, create_backend(settings)), external)


def create_app(settings: ExecutorSettings | None = None) -> FastAPI:
    settings = settings or ExecutorSettings()
    executor = build_executor(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await executor.start()
        except BackendError as exc:
            log.error("event=startup_failed backend=%s error=%s", settings.backend, exc)
            await executor.stop()
            raise
        log.info("event=executor_ready backend=%s port=%d", settings.backend, settings.port)
        try:
            yield
        finally:
            await executor.stop()

    app = FastAPI(title=SERVICE_NAME, version=__version__, lifespan=lifespan)
    app.state.executor = executor
    install_error_handlers(app)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: Exception) -> JSONResponse:
        return error_response(503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(TrajectoryBusy)
    async def trajectory_busy(request: Request, exc: Exception) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(UnknownTrajectory)
    async def unknown_trajectory(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, str(exc))

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"message": SERVICE_NAME, "version": __version__}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, reason = executor.pool.healthy()
        if ok:
            return JSONResponse({"status": "ok"})
        status = "starting" if reason == "starting" else "degraded"
        return JSONResponse({"status": status, "reason": reason}, status_code=503)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {**executor.status(), "external_tools": executor.external.describe()}

    @app.get("/tools")
    async def tools() -> dict[str, Any]:
        return {"tools": SANDBOX_TOOL_SCHEMAS + list(executor.external.schemas.values())}

    @app.get("/trajectories")
    async def trajectories(
        offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        return executor.describe_trajectories(offset, limit)

    @app.post("/execute")
    async def execute(request: ExecuteRequest) -> ToolResult:
        executor.admit()
        return await executor.execute(request.trajectory_id, request.tool, request.timeout_s)

    @app.post("/execute_batch")
    async def execute_batch(request: ExecuteBatchRequest) -> ExecuteBatchResponse:
        executor.admit(len(request.calls))
        results = await asyncio.gather(
            *(executor.execute(c.trajectory_id, c.tool, c.timeout_s) for c in request.calls)
        )
        return ExecuteBatchResponse(results=list(results))

    @app.post("/release")
    async def release(request: ReleaseRequest) -> dict[str, Any]:
        return await executor.release(request.trajectory_id, request.reset_workspace)

    async def artifact(route: str, trajectory_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        try:
            return await executor.artifact(trajectory_id, route, fields)
        except httpx.HTTPError as exc:
            return {"success": False, "error": f"sandbox did not answer: {exc}"}

    @app.post("/artifacts/read")
    async def artifacts_read(request: ArtifactReadRequest) -> ArtifactReadResponse:
        fields = request.model_dump(exclude={"trajectory_id"})
        answer = await artifact("read", request.trajectory_id, fields)
        return ArtifactReadResponse.model_validate(answer)

    @app.post("/artifacts/list")
    async def artifacts_list(request: ArtifactListRequest) -> ArtifactListResponse:
        fields = request.model_dump(exclude={"trajectory_id"})
        answer = await artifact("list", request.trajectory_id, fields)
        return ArtifactListResponse.model_validate(answer)

    @app.post("/artifacts/archive")
    async def artifacts_archive(request: ArtifactArchiveRequest) -> ArtifactArchiveResponse:
        fields = request.model_dump(exclude={"trajectory_id"})
        answer = await artifact("archive", request.trajectory_id, fields)
        return ArtifactArchiveResponse.model_validate(answer)

    token = settings.token.get_secret_value() if settings.token else None
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(BearerAuthMiddleware, token=token, open_paths={"/", "/health"})
    return app


def __getattr__(name: str) -> Any:
    """``tool_executor_server:app`` is built on first access, from the environment."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)
