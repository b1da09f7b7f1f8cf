"""Cluster status and the agent: leader, peers, regions, /v1/agent/self and health."""

from __future__ import annotations

from typing import Any

from .server import Request, Route, route
from .state import State

VERSION = "1.10.0"
RPC_ADDR = "127.0.0.1:4647"


class StatusAPI:
    def __init__(self, state: State, *, acl_enabled: bool, address: Any) -> None:
        self.state = state
        self.acl_enabled = acl_enabled
        self.address = address  # a callable returning "127.0.0.1:PORT"

    def routes(self) -> list[Route]:
        return [
            # The status endpoints need no ACL token (the docs' "ACL Required: none").
            route("GET", "/v1/status/leader", self.leader, acl=False),
            route("GET", "/v1/status/peers", self.peers, acl=False),
            route("GET", "/v1/regions", self.regions, acl=False),
            route("GET", "/v1/agent/self", self.agent_self),
            route("GET", "/v1/agent/health", self.health, acl=False),
        ]

    # https://developer.hashicorp.com/nomad/api-docs/status#read-leader
    def leader(self, request: Request) -> Any:
        return RPC_ADDR

    # https://developer.hashicorp.com/nomad/api-docs/status#list-peers
    def peers(self, request: Request) -> Any:
        return [RPC_ADDR]

    # https://developer.hashicorp.com/nomad/api-docs/regions#list-regions
    def regions(self, request: Request) -> Any:
        return [self.state.region]

    # https://developer.hashicorp.com/nomad/api-docs/agent#query-self
    def agent_self(self, request: Request) -> Any:
        node = self.state.node
        host, _, port = str(self.address()).partition(":")
        return {
            "config": {
                "Region": self.state.region,
                "Datacenter": node.datacenter,
                "NodeName": node.name,
                "Version": {"Version": VERSION, "Prerelease": "", "Metadata": "", "Revision": ""},
                "ACL": {"Enabled": self.acl_enabled},
                "Client": {"Enabled": True, "NodePool": node.node_pool},
                "Server": {"Enabled": True, "BootstrapExpect": 1},
                "Ports": {"HTTP": int(port or 0), "RPC": 4647, "Serf": 4648},
                "BindAddr": host,
                "DevMode": True,
            },
            "member": {
                "Name": f"{node.name}.{self.state.region}",
                "Addr": host,
                "Port": 4648,
                "Tags": {
                    "role": "nomad",
                    "region": self.state.region,
                    "dc": node.datacenter,
                    "build": VERSION,
                    "bootstrap": "1",
                },
                "Status": "alive",
            },
            "stats": {
                "nomad": {
                    "server": "true",
                    "leader": "true",
                    "leader_addr": RPC_ADDR,
                    "bootstrap": "true",
                    "known_regions": "1",
                },
                "client": {
                    "node_id": node.id,
                    "known_servers": RPC_ADDR,
                    "num_allocations": str(len(self.state.allocs)),
                },
                "raft": {"applied_index": str(self.state.index), "state": "Leader"},
            },
            "stats_raw": None,
        }

    # https://developer.hashicorp.com/nomad/api-docs/agent#health
    def health(self, request: Request) -> Any:
        return {
            "client": {"ok": True, "message": "ok"},
            "server": {"ok": True, "message": "ok"},
        }
