"""An in-test HTTP server implementing the Vault KV version 2 API paths meshgate uses.

No Vault server can be installed on these machines, so this implements exactly
`POST /v1/auth/approle/login` and `GET /v1/<mount>/data/<path>` (with `X-Vault-Token`), as
Vault documents them (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVault:
    def __init__(self) -> None:
        self.kv: dict[str, str] = {}  # "<mount>/<path>" -> value
        self.tokens = {"root-token"}
        self.approle = {"role-1": "secret-1"}
        self.requests: list[tuple[str, str]] = []
        self.down = False


@contextmanager
def fake_vault_kv() -> Iterator[tuple[FakeVault, str]]:
    state = FakeVault()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            state.requests.append(("POST", self.path))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/auth/approle/login" and state.approle.get(
                body.get("role_id")
            ) == body.get("secret_id"):
                token = f"approle-token-{len(state.tokens)}"
                state.tokens.add(token)
                self.reply(200, {"auth": {"client_token": token, "lease_duration": 3600}})
            else:
                self.reply(400, {"errors": ["invalid role or secret id"]})

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            if state.down:
                self.reply(503, {"errors": ["Vault is sealed"]})
                return
            if self.headers.get("X-Vault-Token") not in state.tokens:
                self.reply(403, {"errors": ["permission denied"]})
                return
            mount, _, rest = self.path.removeprefix("/v1/").partition("/data/")
            value = state.kv.get(f"{mount}/{rest}")
            if value is None:
                self.reply(404, {"errors": []})
                return
            self.reply(200, {"data": {"data": {"value": value}, "metadata": {"version": 1}}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
