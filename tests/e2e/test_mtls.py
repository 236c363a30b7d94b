"""Workload identity on the wire: SPIFFE certificates over SDS, sidecar -> gateway mTLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from builders import admin_auth, free_port, write_test_pki
from harness import control_plane, gateway, sidecar, until, upstream, write_policy

from meshgate.xds import types

pytestmark = pytest.mark.e2e


async def test_identity_comes_from_the_certificate_and_renews(tmp_path: Path) -> None:
    listen = free_port()
    async with upstream("alpha") as up_a, upstream("beta") as up_b:
        policy = tmp_path / "policies"
        write_policy(
            policy,
            listen,
            {"alpha": up_a.port, "beta": up_b.port},
            agents={"researcher": ["alpha"], "coder": ["beta"]},
        )
        # 75 s certificates (backdated 60 s for clock skew) renew about 8 s after issue: at
        # half-life, not at a point spread over 50-75 % of it (the default)
        async with (
            control_plane(
                policy,
                tmp_path / "state",
                mtls=True,
                cert_ttl_seconds=75,
                cert_renew_window=(0.5, 0.5),
            ) as cp,
            gateway(cp, tmp_path),
        ):
            async with (
                sidecar(cp, tmp_path, "researcher") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                ok = await client.get("http://alpha.internal/x")
                assert ok.status_code == 200, ok.text
                assert "x-meshgate-agent" not in {k.lower() for k in up_a.hits[-1]["headers"]}
                denied = await client.get("http://beta.internal/x")
                assert denied.status_code == 403
                assert denied.json()["agent"] == "spiffe://agents.test/agent/researcher"

                # the certificate is renewed at half-life and pushed over SDS; traffic goes on
                assert cp.issuer is not None
                first = cp.issuer.issued("spiffe://agents.test/agent/researcher")
                assert first is not None

                def renewed() -> bool:
                    now = cp.issuer.issued("spiffe://agents.test/agent/researcher")  # type: ignore[union-attr]
                    return now is not None and now.serial != first.serial

                await until(renewed, timeout=20, what="certificate renewal")
                node = next(n for n in cp.registry.connections() if n.node_id.startswith("agent/"))
                await until(
                    lambda: (
                        node.types[types.SECRET].version_acked
                        == node.types[types.SECRET].version_sent
                        and not node.types[types.SECRET].in_flight
                    ),
                    what="renewed certificate ACKed",
                )
                again = await client.get("http://alpha.internal/y")
                assert again.status_code == 200
                async with httpx.AsyncClient(
                    headers=admin_auth(cp)
                ) as direct:  # not via the sidecar
                    url = f"http://{cp.admin_address}/v1/identity/researcher"
                    shown = (await direct.get(url)).json()
                current = cp.issuer.issued("spiffe://agents.test/agent/researcher")
                assert current is not None
                assert shown["spiffe_id"] == "spiffe://agents.test/agent/researcher"
                assert int(shown["certificate"]["serial"], 16) == current.serial
                assert [r.split()[0] for r in shown["rules"]] == ["alpha"]

                # rolling the intermediate: new leaves everywhere, traffic never fails
                async with httpx.AsyncClient(headers=admin_auth(cp)) as direct:
                    rotated = await direct.post(f"http://{cp.admin_address}/v1/ca/rotate")
                assert rotated.status_code == 200
                before = current

                def reissued() -> bool:
                    now = cp.issuer.issued("spiffe://agents.test/agent/researcher")  # type: ignore[union-attr]
                    return (
                        now is not None
                        and now.cert_chain_pem[-800:] != before.cert_chain_pem[-800:]
                    )

                await until(reissued, timeout=10, what="leaf from the new intermediate")
                await until(
                    lambda: (
                        node.types[types.SECRET].version_acked
                        == node.types[types.SECRET].version_sent
                        and not node.types[types.SECRET].in_flight
                    ),
                    what="new leaf ACKed",
                )
                for _ in range(3):
                    assert (await client.get("http://alpha.internal/z")).status_code == 200

            # without a certificate the gateway does not even talk HTTP
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=5) as plain:
                    await plain.get(
                        f"http://127.0.0.1:{listen}/x",
                        headers={"Host": "alpha.internal", "x-meshgate-agent": "researcher"},
                    )
            # a client certificate from another CA is refused at the handshake
            ca, cert, key = write_test_pki(tmp_path / "rogue", ["rogue.example"], "rogue")
            rogue = ssl.create_default_context(cafile=str(ca))
            rogue.check_hostname = False
            rogue.verify_mode = ssl.CERT_NONE
            rogue.load_cert_chain(cert, key)
            # refused in the handshake; depending on timing the alert surfaces as an ssl error
            with pytest.raises((httpx.HTTPError, ssl.SSLError)):
                async with httpx.AsyncClient(verify=rogue, timeout=5) as impostor:
                    await impostor.get(
                        f"https://127.0.0.1:{listen}/x", headers={"Host": "alpha.internal"}
                    )
            assert len(up_a.hits) == 5
