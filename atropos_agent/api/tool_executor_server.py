"""``uvicorn atropos_agent.api.tool_executor_server:app``: the previous release's app path.

The app lives in ``atropos_agent.executor.app``; this name stays so that deployments started
that way keep working unchanged.
"""

from __future__ import annotations

from typing import Any

from atropos_agent.executor import app as executor_app
from atropos_agent.executor.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """``app`` is built on first access, from the environment, as the executor module's is."""
    if name == "app":
        return executor_app.app
    raise AttributeError(name)
