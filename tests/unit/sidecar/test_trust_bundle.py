"""The agent's trust: the system's CAs plus the agent-trust CA, in files the agent can read but
not change, named by the variables common runtimes read."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from builders import write_test_pki

from meshgate.errors import ConfigError
from meshgate.identity.agent_trust import AgentTrustCA
from meshgate.sidecar.launcher import agent_trust_environment
from meshgate.sidecar.trust_bundle import (
    BUNDLE_VARIABLES,
    EXTRA_CA_VARIABLES,
    system_bundle,
    trust_environment,
    write_trust_files,
)


def test_bundle_adds_the_ca_to_the_system_store(tmp_path: Path) -> None:
    ca = AgentTrustCA.load_or_create(tmp_path / "state")
    files = write_trust_files(tmp_path / "trust", ca.ca_pem(), environ={})
    system = system_bundle({}).read_bytes()
    bundle = files.bundle.read_bytes()
    assert bundle.startswith(system) and bundle.endswith(ca.ca_pem())
    assert files.ca.read_bytes() == ca.ca_pem()
    for path in (files.bundle, files.ca):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # a TLS client given the bundle trusts both the system's roots and the agent-trust CA
    ctx = ssl.create_default_context(cafile=str(files.bundle))
    names = [dict(x[0] for x in c["subject"]).get("commonName") for c in ctx.get_ca_certs()]
    assert "meshgate agent trust CA" in names
    assert len(names) > 10  # the system's roots are still there


def test_the_launchers_own_ssl_cert_file_is_the_base(tmp_path: Path) -> None:
    corporate, _, _ = write_test_pki(tmp_path / "corp", ["x.example"], "corporate")
    ca = AgentTrustCA.load_or_create(tmp_path / "state")
    files = write_trust_files(tmp_path / "t", ca.ca_pem(), {"SSL_CERT_FILE": str(corporate)})
    assert files.bundle.read_bytes().startswith(corporate.read_bytes())


def test_rewriting_replaces_whole_files(tmp_path: Path) -> None:
    one = AgentTrustCA.load_or_create(tmp_path / "a").ca_pem()
    two = AgentTrustCA.load_or_create(tmp_path / "b").ca_pem()
    write_trust_files(tmp_path / "t", one, {})
    files = write_trust_files(tmp_path / "t", two, {})
    assert files.ca.read_bytes() == two
    assert one not in files.bundle.read_bytes()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "agent-trust-ca.pem",
        "ca-bundle.pem",
    ]


def test_not_a_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        write_trust_files(tmp_path, b"-----BEGIN PRIVATE KEY-----\n", {})


def test_variables() -> None:
    env = trust_environment("/t/ca-bundle.pem", "/t/agent-trust-ca.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO"):
        assert env[name] == "/t/ca-bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == "/t/agent-trust-ca.pem"  # added to Node's own store
    assert set(env) == {*BUNDLE_VARIABLES, *EXTRA_CA_VARIABLES}


def test_launcher_finds_the_local_control_planes_ca_or_leaves_trust_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert agent_trust_environment(state, None, tmp_path / "t1") == {}
    assert not (tmp_path / "t1").exists()
    AgentTrustCA.load_or_create(state)
    env = agent_trust_environment(state, None, tmp_path / "t2")
    assert Path(env["SSL_CERT_FILE"]).parent == tmp_path / "t2"
    with pytest.raises(ConfigError, match="--agent-trust-ca"):
        agent_trust_environment(state, tmp_path / "missing.pem", tmp_path / "t3")
