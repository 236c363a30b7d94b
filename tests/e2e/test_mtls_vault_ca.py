"""mTLS through real Envoy with Vault's PKI engine as the upstream CA.

No Vault server can be installed on these machines, so `tests/fake_vault_pki.py` implements
exactly the Vault API paths meshgate uses (AppRole login, `root/sign-intermediate`, `ca/pem`),
signing with a real root key made by `cryptography`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from builders import admin_auth, free_port
from cryptography import x509
from fake_vault_pki import fake_vault_pki
from harness import control_plane, envoy_admin, gateway, sidecar, until, upstream, write_policy

from meshgate.controlplane.vault_ca import VaultCASettings
from meshgate.xds import types

pytestmark = pytest.mark.e2e

RESEARCHER = "spiffe://agents.test/agent/researcher"


def _ca_serials(certs_json: str) -> set[str]:
    """Serials of the CA certificates Envoy holds (its /certs admin page), lowercase hex."""
    found = set()
    for entry in json.loads(certs_json)["certificates"]:
        for ca in entry.get("ca_cert", []):
            found.add(ca["serial_number"].lower().lstrip("0"))
    return found


async def test_agent_reaches_upstream_with_certificates_from_a_vault_signed_intermediate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_SECRET_ID", "secret-1")
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    listen = free_port()
    with fake_vault_pki() as vault:
        settings = VaultCASettings(vault.url, role_id="role-1")
        async with upstream("alpha") as up_a, upstream("beta") as up_b:
            policy = tmp_path / "policies"
            write_policy(
                policy, listen, {"alpha": up_a.port, "beta": up_b.port},
                agents={"researcher": ["alpha"]},
            )  # fmt: skip
            async with (
                control_plane(policy, tmp_path / "state", mtls=True, vault_ca=settings) as cp,
                gateway(cp, tmp_path) as gw,
                sidecar(cp, tmp_path, "researcher") as proxy,
                httpx.AsyncClient(proxy=proxy, timeout=10) as client,
            ):
                ok = await client.get("http://alpha.internal/x")
                assert ok.status_code == 200, ok.text
                denied = await client.get("http://beta.internal/x")
                assert denied.status_code == 403
                assert denied.json()["agent"] == RESEARCHER

                # both proxies validate peers against Vault's root, not a meshgate root
                root_serial = format(vault.root.serial_number, "x")
                assert _ca_serials(await envoy_admin(gw, "/certs")) == {root_serial}
                assert cp.issuer is not None
                leaf = cp.issuer.issued(RESEARCHER)
                assert leaf is not None
                chain = x509.load_pem_x509_certificates(leaf.cert_chain_pem)
                assert chain[1] == vault.signed[0]
                assert chain[1].issuer == vault.root.subject
                assert b"PRIVATE KEY" not in vault.bodies()

                async with httpx.AsyncClient(headers=admin_auth(cp)) as direct:
                    shown = (
                        await direct.get(f"http://{cp.admin_address}/v1/identity/researcher")
                    ).json()
                assert shown["ca"]["source"] == f"vault:{vault.url}/pki"

                # `meshgate ca rotate`: Vault signs a new intermediate; traffic never fails
                node = next(n for n in cp.registry.connections() if n.node_id.startswith("agent/"))
                async with httpx.AsyncClient(headers=admin_auth(cp)) as direct:
                    rotated = await direct.post(f"http://{cp.admin_address}/v1/ca/rotate")
                assert rotated.status_code == 200, rotated.text
                assert len(vault.signed) == 2

                def from_new_intermediate() -> bool:
                    now = cp.issuer.issued(RESEARCHER)  # type: ignore[union-attr]
                    return now is not None and (
                        x509.load_pem_x509_certificates(now.cert_chain_pem)[1] == vault.signed[1]
                    )

                await until(from_new_intermediate, timeout=10, what="leaf from new intermediate")
                sds = types.SECRET
                await until(
                    lambda: (
                        node.types[sds].version_acked == node.types[sds].version_sent
                        and not node.types[sds].in_flight
                    ),
                    what="new leaf ACKed",
                )
                for _ in range(3):
                    assert (await client.get("http://alpha.internal/z")).status_code == 200

                # Vault sealed: rotation is refused in one line, the current intermediate serves
                vault.down = True
                async with httpx.AsyncClient(headers=admin_auth(cp)) as direct:
                    refused = await direct.post(f"http://{cp.admin_address}/v1/ca/rotate")
                assert refused.status_code == 409
                assert "cannot rotate" in refused.json()["error"]
                assert (await client.get("http://alpha.internal/after")).status_code == 200
                assert len(up_a.hits) == 5


MESHGATE = [sys.executable, "-m", "meshgate.cli"]


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHGATE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_serve_with_vault_ca_from_the_command_line(tmp_path: Path) -> None:
    xds, admin = free_port(), free_port()
    write_policy(tmp_path / "policies", free_port(), {"alpha": free_port()})
    env = {**os.environ, "COLUMNS": "200", "VAULT_TOKEN": "root-token"}
    serve = ["serve", "--policies", str(tmp_path / "policies"), "--state-dir",
             str(tmp_path / "state"), "--xds-port", str(xds), "--admin-port", str(admin),
             "--ca", "vault", "--vault-pki-mount", "pki"]  # fmt: skip
    admin_url = f"http://127.0.0.1:{admin}"
    state = ("--state-dir", str(tmp_path / "state"))  # where its admin token is

    # Vault unreachable and nothing stored: one line, exit 1, nothing listening
    down = _run(*serve, "--vault-address", f"http://127.0.0.1:{free_port()}", env=env)
    assert down.returncode == 1
    assert down.stderr.strip().count("\n") == 0
    assert "cannot reach Vault's PKI engine and no intermediate is stored" in down.stderr

    with fake_vault_pki() as vault:
        proc = subprocess.Popen(
            [*MESHGATE, *serve, "--vault-intermediate-ttl", "240h"],
            env={**env, "VAULT_ADDR": vault.url},  # the address from the environment
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not vault.signed:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "no intermediate signed in 30s"
                time.sleep(0.1)
            lifetime = vault.signed[0].not_valid_after_utc - vault.signed[0].not_valid_before_utc
            assert 239 * 3600 < lifetime.total_seconds() < 241 * 3600
            shown = _run(
                "identity", "show", "--agent", "researcher", "--admin", admin_url, *state, env=env
            )
            assert shown.returncode == 0, shown.stderr
            assert f"issued by    vault:{vault.url}/pki intermediate" in shown.stdout
            status = _run("status", "--admin", admin_url, *state, env=env)
            assert f"ca vault:{vault.url}/pki, intermediate" in status.stdout
            rotated = _run("ca", "rotate", "--admin", admin_url, *state, env=env)
            assert rotated.returncode == 0, rotated.stderr
            assert format(vault.signed[1].serial_number, "x") in rotated.stdout
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
