"""An in-test Consul HTTP API, for the catalogue watcher and gateway registration tests.

No Consul server can be installed on these machines, so this implements exactly the API paths
meshgate uses, with Consul's semantics for them:

* `GET /v1/health/service/<name>` with `passing`, `tag`, `dc`, and blocking queries: every answer
  carries `X-Consul-Index`; with `index=N` the request blocks until the service's index moves
  past N or `wait` (a Go duration, default 5m) runs out, then answers the current state;
* `PUT /v1/agent/service/register` (JSON body) and `PUT /v1/agent/service/deregister/<id>`;
* ACLs: when `token` is set, a request without that `X-Consul-Token` gets 403 "ACL not found".

`set_failing(500)` makes every request answer that status (Consul "answering errors").
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    parts = re.findall(r"([0-9.]+)(ns|us|ms|s|m|h)", text)
    if not parts:
        raise ValueError(text)
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class Instance:
    id: str
    port: int
    address: str = "127.0.0.1"
    tags: tuple[str, ...] = ()
    passing: bool = True


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    started: float
    answered: float = 0.0


@dataclass
class FakeConsul:
    url: str = ""
    token: str | None = None
    datacenter: str = "dc1"
    fail_with: int | None = None
    services: dict[str, dict[str, Instance]] = field(default_factory=dict)
    registered: dict[str, dict[str, Any]] = field(default_factory=dict)  # agent services by id
    requests: list[Request] = field(default_factory=list)
    index: int = 10  # the raft index: moves on every write
    service_index: dict[str, int] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    # -- test controls (thread-safe) --------------------------------------------------------------

    def set_instance(self, service: str, inst: Instance) -> None:
        with self.cond:
            self.services.setdefault(service, {})[inst.id] = inst
            self._bump(service)

    def remove_instance(self, service: str, instance_id: str) -> None:
        with self.cond:
            self.services.get(service, {}).pop(instance_id, None)
            self._bump(service)

    def set_passing(self, service: str, instance_id: str, passing: bool) -> None:
        with self.cond:
            self.services[service][instance_id].passing = passing
            self._bump(service)

    def set_failing(self, status: int | None) -> None:
        """Answer every request (blocked ones at once) with `status`; None: healthy again."""
        with self.cond:
            self.fail_with = status
            self.cond.notify_all()

    def health_requests(self, service: str) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.path == f"/v1/health/service/{service}"]

    def _bump(self, service: str) -> None:
        self.index += 1
        self.service_index[service] = self.index
        self.cond.notify_all()

    # -- the API ---------------------------------------------------------------------------------

    def health(self, service: str, query: dict[str, list[str]]) -> tuple[int, list[Any]]:
        """Blocks (holding no lock while waiting) per Consul's blocking-query rules."""
        wanted = int(query.get("index", ["0"])[0] or 0)
        wait = go_duration(query["wait"][0]) if "wait" in query else 300.0
        deadline = time.monotonic() + min(wait, 600.0)
        with self.cond:
            while wanted and self.service_index.get(service, 1) <= wanted:
                left = deadline - time.monotonic()
                if left <= 0 or self.fail_with is not None:
                    break
                self.cond.wait(left)
            current = self.service_index.get(service, 1)
            entries = []
            for inst in sorted(self.services.get(service, {}).values(), key=lambda i: i.id):
                if "passing" in query and not inst.passing:
                    continue
                if "tag" in query and not set(query["tag"]) <= set(inst.tags):
                    continue
                entries.append(self._entry(service, inst))
        return current, entries

    def _entry(self, service: str, inst: Instance) -> dict[str, Any]:
        status = "passing" if inst.passing else "critical"
        return {
            "Node": {"Node": f"node-{inst.id}", "Address": "10.255.0.1", "Datacenter": "dc1"},
            "Service": {
                "ID": inst.id,
                "Service": service,
                "Tags": list(inst.tags),
                "Address": inst.address,
                "Port": inst.port,
            },
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing"},
                {"CheckID": f"service:{inst.id}", "Status": status},
            ],
        }


@contextmanager
def fake_consul(
    token: str | None = None, tls: ssl.SSLContext | None = None
) -> Iterator[FakeConsul]:
    """`tls`: serve https (the URL then names `localhost`, which the test certificate covers)."""
    state = FakeConsul(token=token)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any, index: int | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if index is not None:
                self.send_header("X-Consul-Index", str(index))
                self.send_header("X-Consul-KnownLeader", "true")
            self.end_headers()
            self.wfile.write(data)

        def _start(self, method: str) -> tuple[Request, bool]:
            url = urllib.parse.urlsplit(self.path)
            req = Request(
                method,
                url.path,
                urllib.parse.parse_qs(url.query, keep_blank_values=True),
                self.headers.get("X-Consul-Token"),
                time.monotonic(),
            )
            with state.cond:
                state.requests.append(req)
            if state.fail_with is not None:
                self.reply(state.fail_with, b"rpc error: No cluster leader")
                return req, False
            if state.token is not None and req.token != state.token:
                self.reply(403, b"ACL not found")
                return req, False
            return req, True

        def do_GET(self) -> None:
            req, ok = self._start("GET")
            if not ok:
                return
            if not req.path.startswith("/v1/health/service/"):
                self.reply(404, b"not implemented by the fake")
                return
            dc = req.query.get("dc", [state.datacenter])[0]
            if dc != state.datacenter:
                self.reply(500, f"No path to datacenter {dc}".encode())
                return
            index, entries = state.health(req.path.rsplit("/", 1)[1], req.query)
            if state.fail_with is not None:  # failed while the query was blocked
                self.reply(state.fail_with, b"rpc error: No cluster leader")
                return
            req.answered = time.monotonic()
            self.reply(200, entries, index)

        def do_PUT(self) -> None:
            req, ok = self._start("PUT")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if not ok:
                return
            if req.path == "/v1/agent/service/register":
                service = json.loads(body)
                with state.cond:
                    state.registered[service.get("id") or service["name"]] = service
                self.reply(200, b"")
            elif req.path.startswith("/v1/agent/service/deregister/"):
                with state.cond:
                    found = state.registered.pop(req.path.rsplit("/", 1)[1], None)
                self.reply(200 if found else 404, b"" if found else b"Unknown service ID")
            else:
                self.reply(404, b"not implemented by the fake")

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            # a client that gave up on a blocking query (a cancelled watch) is normal
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        state.url = f"https://localhost:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        with state.cond:
            state.fail_with = 503  # release blocked queries
            state.cond.notify_all()
        server.shutdown()
        server.server_close()
