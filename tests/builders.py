"""Shared fixture builders: policy models in code, free ports, an ADS server on loopback."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meshgate.controlplane.ads import SERVER_OPTIONS, AdsService
from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.registry import NodeRegistry
from meshgate.controlplane.streams import Authenticator
from meshgate.policy.model import AgentPolicy, Destination, EgressRule, Mesh, PolicyModel

_PORTS = itertools.count(20000 + (os.getpid() * 7919) % 12000)


def free_port() -> int:
    """A port for a listener whose number must be known before it binds (an Envoy listener
    named in policy). Taken below the kernel's ephemeral range (32768+), so no port-0 bind or
    outgoing connection can take it between here and the bind, and never twice in a process."""
    while True:
        port = 20000 + (next(_PORTS) - 20000) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def admin_auth(cp: Any) -> dict[str, str]:
    """Headers with a running control plane's admin token (its admin API refuses requests
    without it, except probes, JWKS and metrics)."""
    return {"Authorization": f"Bearer {cp.admin_token}"}


def model(
    version: str = "v1",
    destinations: tuple[Destination, ...] | None = None,
    listen_port: int = 15001,
    agents: tuple[AgentPolicy, ...] = (),
) -> PolicyModel:
    if destinations is None:
        destinations = (
            Destination("alpha", "alpha.internal", 80, tls="none", address=("127.0.0.1", 9001)),
            Destination("beta", "beta.internal", 80, tls="none", address=("127.0.0.1", 9002)),
        )
    if not agents:
        agents = (AgentPolicy("researcher", "researcher", (EgressRule(destinations[0].name),)),)
    return PolicyModel(Mesh(gateway_listen_port=listen_port), destinations, agents, version)


@dataclass
class AdsHarness:
    cache: SnapshotCache
    registry: NodeRegistry
    address: str
    service: AdsService


@asynccontextmanager
async def ads_server(
    authenticate: Authenticator | None = None, max_concurrent_pushes: int = 100
) -> AsyncIterator[AdsHarness]:
    cache = SnapshotCache()
    registry = NodeRegistry()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = AdsService(
        cache, registry, max_concurrent_pushes=max_concurrent_pushes, **_auth(authenticate)
    )
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield AdsHarness(cache, registry, f"127.0.0.1:{port}", service)
    finally:
        await server.stop(grace=0)


def _auth(authenticate: Authenticator | None) -> dict[str, Authenticator]:
    return {"authenticate": authenticate} if authenticate else {}


class AdsClient:
    """A scripted ADS client over a real gRPC stream: send requests, await responses."""

    def __init__(
        self, address: str, delta: bool = False, metadata: tuple[tuple[str, str], ...] = ()
    ):
        import asyncio

        from envoy.service.discovery.v3 import ads_pb2_grpc

        self._asyncio = asyncio
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.outbox: asyncio.Queue[object] = asyncio.Queue()
        method = (
            self.stub.DeltaAggregatedResources if delta else self.stub.StreamAggregatedResources
        )
        self.call = method(self._requests(), metadata=metadata or None)
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.inbox.put_nowait(response)
        except BaseException as exc:  # surfaced to the test by recv()
            self.inbox.put_nowait(exc)

    async def _requests(self):  # type: ignore[no-untyped-def]
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            yield item

    def send(self, request: object) -> None:
        self.outbox.put_nowait(request)

    async def recv(self, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        got = await self._asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        return got

    async def expect_silence(self, seconds: float = 0.3) -> None:
        try:
            got = await self._asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {got}")

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close()


def _san(host: str) -> Any:
    import ipaddress

    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_test_pki(
    directory: Path, hosts: list[str], name: str = "test"
) -> tuple[Path, Path, Path]:
    """A throwaway CA and one server certificate for `hosts`: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# The smallest policy documents: a Mesh, and a Destination (% (name, name)) on a dead address
MESH_YAML = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: agents.test, egressGateway: {listenPort: 15001}}
"""
DEST_YAML = """\
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {name: %s}
spec: {host: %s.internal, port: 80, tls: none, address: "127.0.0.1:9"}
"""
