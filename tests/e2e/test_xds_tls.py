"""The xDS port over TLS: nodes verify the control plane before sending a token or taking config."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from builders import free_port, write_test_pki
from harness import control_plane, upstream, via_gateway, write_policy

from meshgate.controlplane.server import ControlPlane
from meshgate.errors import MeshgateError
from meshgate.identity.xds_tls import bundle_path
from meshgate.sidecar.envoy_process import EnvoyProcess
from meshgate.sidecar.launcher import prepare_envoy

pytestmark = pytest.mark.e2e


def tls_control_plane(
    policy: Path, state: Path, **tls: Any
) -> contextlib.AbstractAsyncContextManager[ControlPlane]:
    """Join tokens required; mTLS off so a plain client can probe the gateway."""
    return control_plane(policy, state, require_tokens=True, **tls)


def gateway_envoy(
    cp: ControlPlane, state: Path, xds_ca: Path | None = None, token_file: Path | None = None
) -> EnvoyProcess:
    return prepare_envoy(
        "gateway/tls",
        "gateway/tls",
        cp.xds_address,
        state,
        token_file,
        file_stem="gateway-tls",
        xds_ca=xds_ca,
    )


async def plaintext_call(address: str) -> str:
    """Any RPC over plaintext; how it ended (a TLS port never gets as far as UNIMPLEMENTED)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await channel.unary_unary("/meshgate.Probe/Nothing")(b"", timeout=3)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def test_nodes_verify_the_control_plane_and_plaintext_is_refused(tmp_path: Path) -> None:
    listen = free_port()
    state = tmp_path / "state"
    async with upstream("alpha") as up:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up.port})
        async with tls_control_plane(policy, state, xds_tls=True) as cp:
            # the bundle is published in the state dir: a local launcher finds it on its own
            assert bundle_path(state).is_file()
            envoy = gateway_envoy(cp, state)
            await envoy.start()
            try:
                await envoy.wait_ready(30)
                ok = await via_gateway(listen, "alpha.internal", "/x")
                assert ok.status_code == 200
            finally:
                await envoy.stop()

            # a plaintext client cannot even speak gRPC to the xDS port
            assert await plaintext_call(cp.xds_address) == "UNAVAILABLE"

            # a node that trusts another CA never gets config (nor sends its token)
            other_ca, _, _ = write_test_pki(tmp_path / "other", ["127.0.0.1"])
            assert cp.tokens is not None  # a valid token: only the CA is wrong
            token_file = tmp_path / "token"
            token_file.write_text(cp.tokens.create("gateway/tls", 600)[0])
            wrong = gateway_envoy(cp, tmp_path / "other-state", other_ca, token_file)
            await wrong.start()
            try:
                with pytest.raises(Exception, match="ready"):
                    await wrong.wait_ready(4)
                assert not [n for n in cp.registry.connections() if n.node_id == "gateway/tls"]
            finally:
                await wrong.stop()

        # plaintext again: the bundle is withdrawn, so local launchers don't expect TLS
        async with tls_control_plane(policy, state):
            assert not bundle_path(state).exists()


async def test_operator_certificate_and_mismatched_key(tmp_path: Path) -> None:
    listen = free_port()
    ca, cert, key = write_test_pki(tmp_path / "pki", ["127.0.0.1", "localhost"])
    async with upstream("alpha") as up:
        policy = tmp_path / "policies"
        write_policy(policy, listen, {"alpha": up.port})
        async with tls_control_plane(
            policy, tmp_path / "state", xds_tls=True, xds_cert_file=cert, xds_key_file=key
        ) as cp:
            envoy = gateway_envoy(cp, tmp_path / "state", xds_ca=ca)
            await envoy.start()
            try:
                await envoy.wait_ready(30)
            finally:
                await envoy.stop()
        _, _, other_key = write_test_pki(tmp_path / "pki2", ["127.0.0.1"])
        with pytest.raises(MeshgateError, match="does not match"):
            async with tls_control_plane(
                policy,
                tmp_path / "state2",
                xds_tls=True,
                xds_cert_file=cert,
                xds_key_file=other_key,
            ):
                pass
