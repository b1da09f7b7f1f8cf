"""Nomad Variables: /v1/var/:path and /v1/vars (command/agent/variable_endpoint.go)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .common import Json, NomadError, now_ns
from .server import Reply, Request, Route, route
from .state import State, Variable

PATH_RE = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")

# Called (under the state lock) after a variable is written or deleted.
ChangeListener = Callable[[str, str], None]


def metadata(variable: Variable) -> Json:
    return {
        "Namespace": variable.namespace,
        "Path": variable.path,
        "CreateIndex": variable.create_index,
        "ModifyIndex": variable.modify_index,
        "CreateTime": variable.create_time,
        "ModifyTime": variable.modify_time,
    }


def with_items(variable: Variable) -> Json:
    return {**metadata(variable), "Items": dict(variable.items)}


class VariablesAPI:
    def __init__(self, state: State, on_change: ChangeListener) -> None:
        self.state = state
        self.on_change = on_change

    def routes(self) -> list[Route]:
        pattern = "/v1/var/(?P<path>.+)"
        return [
            route("GET", "/v1/vars", self.list_variables),
            route("GET", pattern, self.read),
            route("PUT,POST", pattern, self.write),
            route("DELETE", pattern, self.delete),
        ]

    # https://developer.hashicorp.com/nomad/api-docs/variables/variables#list-variables
    def list_variables(self, request: Request) -> Any:
        prefix = request.query.get("prefix", "")
        with self.state.lock:
            found = [
                metadata(v)
                for (namespace, path), v in sorted(self.state.variables.items())
                if (request.namespace == "*" or namespace == request.namespace)
                and path.startswith(prefix)
            ]
            return found

    # https://developer.hashicorp.com/nomad/api-docs/variables/variables#read-variable
    def read(self, request: Request) -> Any:
        with self.state.lock:
            variable = self.state.variables.get((request.namespace, request.params["path"]))
            if variable is None:
                raise NomadError(404, "variable not found")
            return Reply(with_items(variable), index=variable.modify_index)

    # https://developer.hashicorp.com/nomad/api-docs/variables/variables#create-variable
    def write(self, request: Request) -> Any:
        path = request.params["path"]
        body = request.json()
        if not isinstance(body, dict):
            raise NomadError(
                400, "json: cannot unmarshal into Go value of type structs.VariableDecrypted"
            )
        items = body.get("Items")
        if not items:
            raise NomadError(400, "variable missing required Items object")
        if not isinstance(items, dict) or not all(isinstance(v, str) for v in items.values()):
            raise NomadError(
                400,
                "json: cannot unmarshal into Go struct field VariableDecrypted.Items "
                "of type string",
            )
        if not PATH_RE.match(path):
            raise NomadError(500, f'invalid path "{path}"')
        namespace = request.query.get("namespace") or str(body.get("Namespace") or "default")
        cas = self._cas(request)
        with self.state.lock:
            key = (namespace, path)
            current = self.state.variables.get(key)
            conflict = self._conflict(current, cas, namespace, path)
            if conflict is not None:
                return Reply(conflict, status=409, index=conflict["ModifyIndex"])
            index = self.state.next_index()
            stamp = now_ns()
            variable = Variable(
                namespace=namespace,
                path=path,
                items={str(k): str(v) for k, v in items.items()},
                create_index=current.create_index if current else index,
                create_time=current.create_time if current else stamp,
                modify_index=index,
                modify_time=stamp,
            )
            self.state.variables[key] = variable
            self.on_change(namespace, path)
            return Reply(with_items(variable), index=index)

    # https://developer.hashicorp.com/nomad/api-docs/variables/variables#delete-variable
    def delete(self, request: Request) -> Any:
        path = request.params["path"]
        namespace = request.namespace
        cas = self._cas(request)
        with self.state.lock:
            key = (namespace, path)
            current = self.state.variables.get(key)
            if cas is not None and current is not None and current.modify_index != cas:
                return Reply(metadata(current), status=409, index=current.modify_index)
            index = self.state.next_index()
            if current is not None:
                del self.state.variables[key]
                self.on_change(namespace, path)
            return Reply(None, status=204, index=index)

    @staticmethod
    def _cas(request: Request) -> int | None:
        raw = request.query.get("cas")
        if raw is None or raw == "":
            return None
        if not raw.isdigit():
            raise NomadError(
                400, f'can not parse cas: strconv.ParseUint: parsing "{raw}": invalid syntax'
            )
        return int(raw)

    @staticmethod
    def _conflict(
        current: Variable | None, cas: int | None, namespace: str, path: str
    ) -> Json | None:
        if cas is None:
            return None
        if current is None:
            if cas == 0:
                return None
            return {
                "Namespace": namespace,
                "Path": path,
                "CreateIndex": 0,
                "ModifyIndex": 0,
                "CreateTime": 0,
                "ModifyTime": 0,
                "Items": None,
            }
        if current.modify_index != cas:
            return with_items(current)
        return None
