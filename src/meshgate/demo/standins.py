"""The demo's upstreams, started together on loopback with TLS: an OpenAI-compatible provider
that checks the key only the gateway holds, and an MCP server. Each logs what reached it, so the
demo's terminal shows the other side of every call the agents make."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from meshgate.demo.certs import write_upstream_pki
from meshgate.demo.llm_provider import LlmProvider
from meshgate.demo.mcp_server import McpStandIn
from meshgate.demo.policy import LLM_HOST, MCP_HOST

Log = Callable[[str], None]


@dataclass
class LoggedProvider(LlmProvider):
    log: Log = print

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._log_request)
        return app

    @web.middleware
    async def _log_request(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        response = await handler(request)
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = "the demo key (injected by the gateway)" if sent == self.api_key else repr(sent)
        self.log(f"{request.method} {request.path} -> {response.status}; key: {key}")
        return response


@dataclass
class StandIns:
    llm_port: int
    mcp_port: int
    ca_dir: Path
    provider: LoggedProvider
    mcp: McpStandIn = field(repr=False)

    async def stop(self) -> None:
        await self.mcp.stop()
        await self.provider.stop()


async def start_standins(ca_dir: Path, key_dir: Path, api_key: str, log: Log) -> StandIns:
    """Both stand-ins on 127.0.0.1, ports from the OS, certificates from a fresh demo CA whose
    certificate lands in `ca_dir` (the policy's caFile) and whose key is never kept."""
    _, cert, key = write_upstream_pki(ca_dir, key_dir, [LLM_HOST, MCP_HOST])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    provider = LoggedProvider(
        reply_tokens=8, token_delay=0.05, api_key=api_key, log=lambda m: log(f"{LLM_HOST}: {m}")
    )
    llm_port = await provider.start("127.0.0.1", 0, tls)
    mcp = McpStandIn(MCP_HOST, cert, key, log=lambda m: log(f"{MCP_HOST}: {m}"))
    try:
        mcp_port = await mcp.start("127.0.0.1", 0)
    except BaseException:
        await provider.stop()
        raise
    return StandIns(llm_port, mcp_port, ca_dir, provider, mcp)
