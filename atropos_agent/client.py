"""The trainer-side client: the executor's routes as methods, sync and async.

    from atropos_agent.client import ExecutorClient

    with ExecutorClient("http://127.0.0.1:9001", token="...") as executor:
        result = executor.execute("trajectory-1", "terminal", {"command": "ls"})
        files = executor.list_artifacts("trajectory-1", recursive=True)
        executor.release("trajectory-1")

``AsyncExecutorClient`` has the same methods as coroutines. HTTP errors (401, 404, 503...)
raise ``ExecutorError`` with the service's message; a tool that failed is not an error, it is a
``ToolResult`` with ``success`` false.
"""

from __future__ import annotations

from typing import Any

import httpx

from atropos_agent.models import (
    MAX_TIMEOUT_S,
    ArtifactArchiveResponse,
    ArtifactListResponse,
    ArtifactReadResponse,
    ToolCall,
    ToolResult,
)

# The HTTP read timeout covers the longest command the service honours, plus its grace.
READ_TIMEOUT_S = MAX_TIMEOUT_S + 90


class ExecutorError(Exception):
    """The service refused a request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = str(response.json().get("error") or response.text)
        except ValueError:
            message = response.text
        raise ExecutorError(response.status_code, message)
    return response.json()


def _execute_body(
    trajectory_id: str, tool: str, arguments: dict[str, Any] | None, timeout_s: float | None
) -> dict[str, Any]:
    call = ToolCall(name=tool, arguments=arguments or {})
    return {"trajectory_id": trajectory_id, "tool": call.model_dump(), "timeout_s": timeout_s}


def _options(token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return {"headers": headers, "timeout": httpx.Timeout(30.0, read=READ_TIMEOUT_S)}


class ExecutorClient:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.http = httpx.Client(base_url=url, **_options(token))

    def __enter__(self) -> ExecutorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> ToolResult:
        body = _execute_body(trajectory_id, tool, arguments, timeout_s)
        return ToolResult.model_validate(_checked(self.http.post("/execute", json=body)))

    def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        """``calls``: ExecuteRequest dicts (``trajectory_id``, ``tool``, ``timeout_s``)."""
        answer = _checked(self.http.post("/execute_batch", json={"calls": calls}))
        return [ToolResult.model_validate(result) for result in answer["results"]]

    def release(self, trajectory_id: str, reset_workspace: bool = False) -> dict[str, Any]:
        body = {"trajectory_id": trajectory_id, "reset_workspace": reset_workspace}
        answer: dict[str, Any] = _checked(self.http.post("/release", json=body))
        return answer

    def read_artifact(self, trajectory_id: str, path: str, **options: Any) -> ArtifactReadResponse:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return ArtifactReadResponse.model_validate(
            _checked(self.http.post("/artifacts/read", json=body))
        )

    def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return ArtifactListResponse.model_validate(
            _checked(self.http.post("/artifacts/list", json=body))
        )

    def archive_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactArchiveResponse:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return ArtifactArchiveResponse.model_validate(
            _checked(self.http.post("/artifacts/archive", json=body))
        )

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = _checked(self.http.get("/status"))
        return answer


class AsyncExecutorClient:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=url, **_options(token))

    async def __aenter__(self) -> AsyncExecutorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def execute(
        self,
        trajectory_id: str,
        tool: str,
        arguments: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> ToolResult:
        body = _execute_body(trajectory_id, tool, arguments, timeout_s)
        return ToolResult.model_validate(_checked(await self.http.post("/execute", json=body)))

    async def execute_batch(self, calls: list[dict[str, Any]]) -> list[ToolResult]:
        answer = _checked(await self.http.post("/execute_batch", json={"calls": calls}))
        return [ToolResult.model_validate(result) for result in answer["results"]]

    async def release(self, trajectory_id: str, reset_workspace: bool = False) -> dict[str, Any]:
        body = {"trajectory_id": trajectory_id, "reset_workspace": reset_workspace}
        answer: dict[str, Any] = _checked(await self.http.post("/release", json=body))
        return answer

    async def read_artifact(
        self, trajectory_id: str, path: str, **options: Any
    ) -> ArtifactReadResponse:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return ArtifactReadResponse.model_validate(
            _checked(await self.http.post("/artifacts/read", json=body))
        )

    async def list_artifacts(
        self, trajectory_id: str, path: str = ".", **options: Any
    ) -> ArtifactListResponse:
        body = {"trajectory_id": trajectory_id, "path": path, **options}
        return ArtifactListResponse.model_validate(
            _checked(await self.http.post("/artifacts/list", json=body))
        )

    async def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = _checked(await self.http.get("/status"))
        return answer
