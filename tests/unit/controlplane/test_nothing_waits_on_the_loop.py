"""Nothing slow runs on the event loop that serves xDS: a real control plane on loopback, real
gRPC and HTTP, with Vault (tests/fake_vault_pki.py) answering every request after 5 s.

While a CA rotation is stuck in that Vault, and admin requests that read the CA (status,
identity) arrive meanwhile, a new ADS stream gets its first response, a policy change reaches
a connected stream, and /healthz answers, each well before Vault does.
"""

from __future__ import annotations

import asyncio
import queue
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from builders import admin_auth
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from fake_vault_pki import FakeVaultPki, fake_vault_pki

from meshgate.controlplane.server import ControlPlane, ServeOptions
from meshgate.controlplane.sources import DirectorySource
from meshgate.controlplane.vault_ca import VaultCASettings
from meshgate.xds import types

POLICIES = Path(__file__).resolve().parents[3] / "policies"
VAULT_DELAY = 5.0
PROMPT = 1.0  # a response, a push or a probe must come within this, Vault or not

EXTRA = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: late}
spec: {host: late.internal, port: 80, tls: none, address: "127.0.0.1:9"}
"""


def _request(node: str, nonce: str = "", version: str = "") -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node, cluster="meshgate-gateway"),
        type_url=types.CLUSTER,
        response_nonce=nonce,
        version_info=version,
    )


@pytest.fixture
async def slow_vault_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ControlPlane, FakeVaultPki, Path]]:
    monkeypatch.setenv("VAULT_TOKEN", "root-token")
    policy = tmp_path / "policies"
    shutil.copytree(POLICIES, policy)
    with fake_vault_pki() as vault:
        opts = ServeOptions(
            "127.0.0.1",
            0,
            "127.0.0.1",
            0,
            "127.0.0.1",
            debounce_quiet=0.01,
            secrets_interval=0.2,
            mtls=True,
            vault_ca=VaultCASettings(vault.url),
        )
        cp = ControlPlane(DirectorySource(policy, interval=0.05), tmp_path / "state", opts)
        await cp.start()
        try:
            for _ in range(400):
                if cp.ready:
                    break
                await asyncio.sleep(0.05)
            assert cp.ready, cp.policy.to_json()
            yield cp, vault, policy
        finally:
            vault.delay = 0
            await cp.stop()


class SyncAds:
    """A blocking ADS client for a probe thread: its timings do not depend on the event loop
    under test, which a stalled handler would freeze along with any client on it."""

    def __init__(self, address: str, node: str) -> None:
        self.node = node
        self.channel = grpc.insecure_channel(address)
        self.outbox: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamAggregatedResources(
            iter(self.outbox.get, None), timeout=VAULT_DELAY * 4
        )

    def request(self, nonce: str = "", version: str = "") -> None:
        self.outbox.put(_request(self.node, nonce, version))

    def recv(self) -> discovery_pb2.DiscoveryResponse:
        response: discovery_pb2.DiscoveryResponse = next(self.responses)
        return response

    def close(self) -> None:
        self.outbox.put(None)
        self.responses.cancel()
        self.channel.close()


def _probe(cp: ControlPlane, watcher: SyncAds, policy: Path) -> dict[str, float]:
    """Seconds each took: /healthz, a new stream's first response, a policy push."""
    took: dict[str, float] = {}
    time.sleep(0.3)  # the admin reads of the CA are in by now
    started = time.monotonic()
    assert httpx.get(f"http://{cp.admin_address}/healthz", timeout=30).status_code == 200
    took["healthz"] = time.monotonic() - started

    started = time.monotonic()
    newcomer = SyncAds(cp.xds_address, "gateway/newcomer")
    try:
        newcomer.request()
        assert newcomer.recv().type_url == types.CLUSTER
    finally:
        newcomer.close()
    took["first response"] = time.monotonic() - started

    # a policy change: compiled, built (certificates from the current authority while the
    # rotation is in flight) and pushed to the connected stream
    started = time.monotonic()
    (policy / "late.yaml").write_text(EXTRA)
    push = watcher.recv()
    assert "dest-late" in str(push.resources)
    took["push"] = time.monotonic() - started
    return took


async def test_a_slow_vault_delays_no_xds_response_push_or_probe(
    slow_vault_plane: tuple[ControlPlane, FakeVaultPki, Path],
) -> None:
    cp, vault, policy = slow_vault_plane
    watcher = SyncAds(cp.xds_address, "gateway/watcher")
    try:
        watcher.request()
        first = await asyncio.to_thread(watcher.recv)
        watcher.request(first.nonce, first.version_info)  # ACK

        vault.delay = VAULT_DELAY
        async with httpx.AsyncClient(headers=admin_auth(cp), timeout=30) as client:
            rotation = asyncio.ensure_future(client.post(f"http://{cp.admin_address}/v1/ca/rotate"))
            await asyncio.sleep(0.5)  # the rotation is waiting on Vault now
            assert not rotation.done()
            rotating_since = time.monotonic() - 0.5
            # the probes run in a thread, submitted before the admin reads below are
            probes = asyncio.get_running_loop().run_in_executor(None, _probe, cp, watcher, policy)
            readers = [
                asyncio.ensure_future(client.get(f"http://{cp.admin_address}/status")),
                asyncio.ensure_future(
                    client.get(f"http://{cp.admin_address}/v1/identity/researcher")
                ),
            ]
            took = await probes
            probes_done = time.monotonic()
            for reader in readers:
                assert (await reader).status_code == 200
            rotated = await rotation
            assert rotated.status_code == 200, rotated.text
    finally:
        await asyncio.to_thread(watcher.close)
    assert took["healthz"] < PROMPT, took
    assert took["first response"] < PROMPT, took
    assert took["push"] < PROMPT + 1.0, took  # plus the source's poll, debounce and compile
    assert probes_done - rotating_since < VAULT_DELAY, "the probes ran after Vault answered"
