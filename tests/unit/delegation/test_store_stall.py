"""A PostgreSQL that accepts and then goes silent (a hung server, a half-dead network path, a
proxy in front of it): the store gives up within seconds, not the kernel's ~15 minutes, and
nothing that pushes policy waits for it meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from delegation_stores import pg_schema

from meshgate.controlplane.delegation import Delegation
from meshgate.controlplane.pipeline import CompiledPolicy
from meshgate.controlplane.runtime_inputs import RuntimeInputs
from meshgate.controlplane.secrets import EnvSecrets
from meshgate.delegation.expand import KEY_HEADER
from meshgate.delegation.registry import DelegationRegistry, Request
from meshgate.delegation.rights import RuleGrant
from meshgate.delegation.service import AGENT_HEADER
from meshgate.delegation.stores import DelegationStoreError, open_store
from meshgate.identity.tokens import TokenAuthority
from meshgate.policy.model import (
    AgentPolicy,
    Destination,
    EgressRule,
    Mesh,
    PolicyModel,
)
from meshgate.policy.model import (
    Delegation as DelegationRight,
)

MODEL = PolicyModel(
    Mesh(trust_domain="agents.test"),
    (Destination("alpha", "alpha.internal", 80),),
    (AgentPolicy("sup", "sup", (EgressRule("alpha"),), delegation=DelegationRight(2, 600)),),
    "v1",
)


class SilentProxy:
    """Forwards TCP to `target` until `stall()`; then, for old and new connections alike, it
    keeps reading (so the kernel acknowledges everything) and forwards nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = threading.Event()
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.stalled.set()

    def close(self) -> None:
        self.closing.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            upstream = None
            if not self.stalled.is_set():
                upstream = socket.create_connection(self.target)
                self.sockets.append(upstream)
                threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if dst is not None and not self.stalled.is_set():
                with contextlib.suppress(OSError):
                    dst.sendall(data)


@contextlib.contextmanager
def proxied_pg() -> Iterator[tuple[str, SilentProxy]]:
    with pg_schema() as url:
        parts = urlsplit(url)
        proxy = SilentProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
        netloc = parts.netloc.rpartition("@")
        via = f"{netloc[0]}{netloc[1]}127.0.0.1:{proxy.port}"
        try:
            yield urlunsplit(parts._replace(netloc=via)), proxy
        finally:
            proxy.close()


def test_a_silent_database_fails_a_read_within_seconds(tmp_path: Path) -> None:
    with proxied_pg() as (url, proxy):
        store = open_store(url, tmp_path)
        try:
            assert store.load() == []
            proxy.stall()
            started = time.monotonic()
            with ThreadPoolExecutor(1) as pool:
                reading = pool.submit(store.load)
                try:
                    error = reading.exception(timeout=20)
                finally:
                    proxy.close()  # lets a read that hangs (unfixed) end with the test
            assert isinstance(error, DelegationStoreError), error
            assert "no answer in 6s" in str(error)
            assert time.monotonic() - started < 10
            # and a new connection to it gives up as fast (connect_timeout)
            started = time.monotonic()
            with pytest.raises(DelegationStoreError):
                store.load()
            assert time.monotonic() - started < 10
        finally:
            store.close()


async def test_policy_pushes_do_not_wait_on_a_silent_database(tmp_path: Path) -> None:
    """The runtime inputs (what every policy push reads) answer at once from the last read
    while the store hangs, and the endpoint's store calls do not take the default executor."""
    with proxied_pg() as (url, proxy):
        delegation = Delegation(
            tmp_path, lambda: MODEL, None, lambda: None, "127.0.0.1", 0, store=url
        )
        await delegation.start()
        try:
            registry = delegation.registry
            await asyncio.to_thread(
                registry.create, "sup", Request("web-1", 300, (RuleGrant(0),)), MODEL
            )
            inputs = RuntimeInputs(None, lambda: None, delegation=delegation)  # type: ignore[arg-type,return-value]
            policy = CompiledPolicy(MODEL, MODEL, EnvSecrets(), "test")
            proxy.stall()
            await asyncio.sleep(1.5)  # the refresh thread is now waiting on the database
            for _ in range(3):
                started = time.monotonic()
                read = await asyncio.wait_for(inputs.read(policy), 5)
                assert time.monotonic() - started < 1
                assert [s.name for s in read.sub_agents] == ["sup.web-1"]
            # a burst of endpoint requests, each waiting on the store, leaves the default
            # executor (6 threads here) free for everything else, and each gets its 503
            url = f"http://127.0.0.1:{delegation.server.port}/v1/sub-agents"
            headers = {AGENT_HEADER: "spiffe://agents.test/agent/sup", KEY_HEADER: delegation.key}
            async with httpx.AsyncClient(timeout=60) as client:
                burst = asyncio.gather(*(client.get(url, headers=headers) for _ in range(8)))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 3) == 42
                assert time.monotonic() - started < 1
                answers = await asyncio.wait_for(burst, 60)
            assert [r.status_code for r in answers] == [503] * 8
        finally:
            proxy.close()
            await delegation.stop()


async def test_the_refresh_thread_picks_up_another_replicas_create_and_binds_tokens(
    tmp_path: Path,
) -> None:
    with pg_schema() as url:
        pokes: list[float] = []
        tokens = TokenAuthority(tmp_path)
        delegation = Delegation(
            tmp_path,
            lambda: MODEL,
            tokens,
            lambda: pokes.append(time.monotonic()),
            "127.0.0.1",
            0,
            store=url,
        )
        await delegation.start()
        other = open_store(url, tmp_path)
        try:
            assert tokens.sub_agent_token == delegation.registry.token_of
            replica = DelegationRegistry(other, time.time)
            await asyncio.to_thread(
                replica.create, "sup", Request("web-1", 300, (RuleGrant(0),)), MODEL, "tok-1"
            )
            deadline = time.monotonic() + 5
            while not pokes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert pokes, "the refresh thread did not poke the runtime inputs"
            assert [s.name for s in delegation.sub_agents()] == ["sup.web-1"]
            assert delegation.registry.token_of("sup.web-1") == "tok-1"
        finally:
            other.close()
            await delegation.stop()
        assert tokens.sub_agent_token is None  # stopped: no sub-agent token passes
