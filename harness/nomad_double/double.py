"""``NomadDouble``: a Nomad agent (server + one raw_exec client) inside the test process."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .allocations import AllocationsAPI, full
from .common import Json, deep_copy
from .evaluations import EvaluationsAPI, eval_json
from .jobs import JobsAPI
from .node import Client
from .scaling import ScalingAPI
from .scheduler import Scheduler
from .server import API
from .services import ServicesAPI
from .state import Node, State
from .status import StatusAPI
from .variables import VariablesAPI


class NomadDouble:
    """A faithful-enough Nomad HTTP API on 127.0.0.1 whose allocations run as real processes.

    ``acl_token``: when set, every endpoint that Nomad guards needs ``X-Nomad-Token`` (or
    ``Authorization: Bearer``) equal to it. ``deployment_seconds``: how long a deployment
    stays active after a new job version. ``max_wait_s`` caps blocking-query waits.
    ``host_env``: the environment tasks inherit (default: this process's, minus Nomad's
    denylist). ``drivers``: drivers the node has (raw_exec is the only one that can run).
    """

    def __init__(
        self,
        acl_token: str | None = None,
        *,
        region: str = "global",
        datacenter: str = "dc1",
        namespaces: Iterable[str] = ("default",),
        deployment_seconds: float = 2.0,
        max_wait_s: float = 10.0,
        host_env: Mapping[str, str] | None = None,
        drivers: Iterable[str] = ("raw_exec",),
        node_cpu_mhz: int = 40_000,
        node_memory_mb: int = 65_536,
        root: Path | None = None,
    ) -> None:
        node = Node(
            datacenter=datacenter,
            cpu_mhz=node_cpu_mhz,
            memory_mb=node_memory_mb,
            drivers=set(drivers),
        )
        self.state = State(region=region, namespaces=set(namespaces), node=node)
        self._own_root = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="nomad-double-"))
            root.chmod(0o711)  # traversable: tasks may run as other uids below alloc dirs
        self.root = root
        self.client = Client(self.state, self.root, os.environ if host_env is None else host_env)
        self.scheduler = Scheduler(self.state, self.client, deployment_seconds=deployment_seconds)
        routes = [
            *ScalingAPI(self.state, self.scheduler).routes(),
            *ServicesAPI(self.state).routes(),
            *JobsAPI(self.state, self.scheduler).routes(),
            *AllocationsAPI(self.state, self.scheduler).routes(),
            *EvaluationsAPI(self.state).routes(),
            *VariablesAPI(self.state, self.client.on_variable_changed).routes(),
            *StatusAPI(
                self.state, acl_enabled=acl_token is not None, address=lambda: self.hostport
            ).routes(),
        ]
        self.api = API(self.state, routes, acl_token=acl_token, max_wait_s=max_wait_s)
        self.acl_token = acl_token
        self.port = 0
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> NomadDouble:
        self.port = self.api.serve(self.port)
        atexit.register(self.close)
        return self

    def stop(self) -> None:
        """Stop answering HTTP (allocations keep running); ``start()`` serves again."""
        self.api.stop()

    def go_down(self) -> None:
        """The agent becomes unreachable: connections are refused, processes keep running."""
        self.api.stop()

    def come_back(self) -> None:
        """Serve again on the same port."""
        self.port = self.api.serve(self.port)

    def close(self) -> None:
        """Stop serving, kill every process the double started, remove its directories."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.api.stop()
        with self.state.changed:
            self.state.closing = True
            self.state.changed.notify_all()
        self.state.cancel_timers()
        self.client.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NomadDouble:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"http://{self.hostport}"

    # -- simulation controls ----------------------------------------------------------------

    def kill_task(self, alloc_id: str) -> int:
        """SIGKILL the allocation's running processes (a crash); returns how many were hit."""
        with self.state.lock:
            if alloc_id not in self.state.allocs:
                raise KeyError(alloc_id)
        return self.client.crash(alloc_id)

    def set_driver_available(self, driver: str, available: bool = True) -> None:
        """Add or remove a driver on the node; blocked evaluations are retried when one appears."""
        with self.state.lock:
            if available:
                self.state.node.drivers.add(driver)
                self.scheduler.unblock(lambda ev: True)
            else:
                self.state.node.drivers.discard(driver)
            self.state.next_index()

    # -- inspection -------------------------------------------------------------------------

    def allocations(self, job_id: str, namespace: str = "default") -> list[Json]:
        """Every allocation of the job (all versions), in Nomad's full allocation shape."""
        with self.state.lock:
            return [full(a) for a in self.state.job_allocs(namespace, job_id, None)]

    def allocation(self, alloc_id: str) -> Json:
        with self.state.lock:
            return full(self.state.allocs[alloc_id])

    def job(self, job_id: str, namespace: str = "default") -> Json | None:
        with self.state.lock:
            job = self.state.jobs.get((namespace, job_id))
            return deep_copy(job) if job is not None else None

    def evaluations(self, job_id: str, namespace: str = "default") -> list[Json]:
        with self.state.lock:
            evals = [
                e
                for e in self.state.evals.values()
                if e.job_id == job_id and e.namespace == namespace
            ]
            return [eval_json(e) for e in sorted(evals, key=lambda e: e.create_index)]

    @property
    def requests(self) -> list[str]:
        """The latest requests served, as "METHOD /path", oldest first."""
        return list(self.api.request_log)

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of requests the double itself failed on (answered 500); should be empty."""
        return list(self.api.internal_errors)

    def pids(self, alloc_id: str) -> dict[str, int | None]:
        """Live process ids of the allocation's tasks (None when not running)."""
        return self.client.pids(alloc_id)

    def alloc_dir(self, alloc_id: str) -> Path:
        return self.root / alloc_id

    def wait_until(
        self, predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout_s}s")
            time.sleep(interval_s)

    def running(self, job_id: str, namespace: str = "default") -> list[Json]:
        """Allocations of the job that are desired to run and running."""
        return [
            a
            for a in self.allocations(job_id, namespace)
            if a["DesiredStatus"] == "run" and a["ClientStatus"] == "running"
        ]
