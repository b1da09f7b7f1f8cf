"""Finding the executors through Nomad's native service discovery.

``GET /v1/service/<name>?namespace=...`` lists the registrations of the service's running
allocations; each executor is ``http://{Address}:{Port}``. The client asks again every
``refresh_s`` and at once when an executor cannot be reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from atropos_agent.client.transport import Answer, Request
from atropos_agent.errors import ExecutorError

DEFAULT_SERVICE = "atropos-tool-executor"
DEFAULT_NOMAD_ADDRESS = "http://127.0.0.1:4646"
NOMAD_READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NomadServices:
    service: str = DEFAULT_SERVICE
    nomad_address: str = DEFAULT_NOMAD_ADDRESS
    nomad_token: str | None = None
    namespace: str = "default"
    refresh_s: float = 10.0

    def request(self) -> Request:
        headers = {"X-Nomad-Token": self.nomad_token} if self.nomad_token else {}
        where = f"{self.nomad_address.rstrip('/')}/v1/service/{quote(self.service, safe='')}"
        params = {"namespace": self.namespace}
        return Request("GET", where, None, headers, params, NOMAD_READ_TIMEOUT_S)

    def urls_of(self, answer: Answer) -> list[str]:
        """The executors' URLs in a registration list, in a stable order."""
        if answer.status != 200:
            text = answer.body.decode(errors="replace").strip()
            raise ExecutorError(
                answer.status, f"Nomad at {self.nomad_address} refused to list {self}: {text}"
            )
        urls = set()
        for registration in json.loads(answer.body):
            address, port = registration["Address"], registration["Port"]
            host = f"[{address}]" if ":" in address else address
            urls.add(f"http://{host}:{port}")
        return sorted(urls)

    def __str__(self) -> str:
        return f"service {self.service!r} (namespace {self.namespace!r})"
