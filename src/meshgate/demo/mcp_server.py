"""The demo's MCP server, built with the official `mcp` SDK (streamable HTTP over TLS).

Three tools, so a policy can show each outcome: `search_docs` (allowed), `open_issue` (allowed
for some arguments only) and `delete_repo` (no rule names it: the gateway refuses it and the
server never hears of it). DNS-rebinding protection stays on, for its real host name only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

DOCS = {
    "rate limits": "rateLimit: {requests: N, per: 1m} on a rule; over it, 429 with retry-after.",
    "credentials": "The gateway injects a destination's secret; agents never hold it.",
    "audit": "Every request, allowed or not, is one record: `meshgate audit query`.",
}


def build_server(log: Callable[[str], None]) -> MCPServer:
    server: MCPServer = MCPServer("meshgate-demo-docs")

    @server.tool()
    def search_docs(query: str) -> str:
        """Search the meshgate docs."""
        log(f"search_docs(query={query!r})")
        hits = [text for topic, text in DOCS.items() if topic in query.lower()]
        return "\n".join(hits) or f"nothing about {query!r}; try 'rate limits' or 'audit'"

    @server.tool()
    def open_issue(repo: str, title: str) -> str:
        """Open an issue in a repository."""
        log(f"open_issue(repo={repo!r}, title={title!r})")
        return f"opened {title!r} in {repo}"

    @server.tool()
    def delete_repo(repo: str) -> str:
        """Delete a repository (the demo policy never allows it)."""
        log(f"delete_repo(repo={repo!r})  <- reached the server: policy did not stop it")
        return f"deleted {repo}"

    return server


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handlers: the meshgate command owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class McpStandIn:
    host_name: str
    cert: Path
    key: Path
    log: Callable[[str], None] = print
    _server: _Server | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def app(self) -> Starlette:
        security = TransportSecuritySettings(allowed_hosts=[self.host_name, f"{self.host_name}:*"])
        return build_server(self.log).streamable_http_app(transport_security=security)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on `host` (TLS with `cert`); the bound port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app(),
            log_level="warning",
            lifespan="on",
            ssl_certfile=str(self.cert),
            ssl_keyfile=str(self.key),
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(200):
            if self._server.started:
                return bound
            if self._task.done():
                await self._task  # raises what stopped it
                break
            await asyncio.sleep(0.05)
        raise RuntimeError("the demo MCP server did not start")

    async def stop(self) -> None:
        server, task, self._server, self._task = self._server, self._task, None, None
        if server is not None and task is not None:
            server.should_exit = True
            await task
