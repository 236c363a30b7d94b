"""What the agent trusts: the system's CAs plus the mesh's agent-trust CA, through the variables
common runtimes read, so `https://` base URLs work behind the sidecar unchanged.

The sidecar terminates the agent's TLS to intercepted destinations with leaves of the agent-trust
CA (identity/agent_trust.py). The bundle adds that CA to the system store rather than replacing
it: other hosts (tunnelled by the gateway, `tls: passthrough`) still verify against the usual
roots, and the agent-trust CA only ever signs destination hosts.

The files are written by the launcher (never by the agent): a directory the agent can read but
not write, with the bundle and the CA alone (Node.js adds NODE_EXTRA_CA_CERTS to its own store,
so it gets just the extra CA; the others replace their store with the file, so they get all).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshgate.errors import ConfigError

BUNDLE_FILE = "ca-bundle.pem"  # system CAs + the agent-trust CA
CA_FILE = "agent-trust-ca.pem"  # the agent-trust CA alone
# Where distributions keep their CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL, macOS/BSD).
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
# Variables that name a whole CA bundle (the file replaces the runtime's default store):
# OpenSSL-based runtimes (Python ssl, httpx, aiohttp, Ruby, PHP), Go, rustls-native-certs;
# requests; curl; git; the AWS SDKs and CLI; pip; httplib2; gRPC core; cargo.
BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
    "HTTPLIB2_CA_CERTS",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "CARGO_HTTP_CAINFO",
)
# Variables that name CAs added to the runtime's own store: Node.js, Deno.
EXTRA_CA_VARIABLES = ("NODE_EXTRA_CA_CERTS", "DENO_CERT")


@dataclass(frozen=True)
class TrustFiles:
    bundle: Path
    ca: Path


def system_bundle(environ: Mapping[str, str] | None = None) -> Path:
    """The CA bundle the agent would use without meshgate: its own SSL_CERT_FILE when the
    launcher's environment names a readable one (a corporate bundle), else the system's, else
    certifi's."""
    env = os.environ if environ is None else environ
    own = env.get("SSL_CERT_FILE")
    if own and Path(own).is_file():
        return Path(own)
    for candidate in SYSTEM_BUNDLES:
        if Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi comes with httpx
        raise ConfigError(
            "no system CA bundle found (looked in " + ", ".join(SYSTEM_BUNDLES) + ")"
        ) from None
    return Path(certifi.where())


def write_trust_files(
    directory: Path, agent_ca_pem: bytes, environ: Mapping[str, str] | None = None
) -> TrustFiles:
    """Write the bundle and the CA into `directory` (created 0755 if missing; files 0644,
    replaced atomically, so an agent reading one never sees half of it)."""
    try:
        x509.load_pem_x509_certificate(agent_ca_pem)
    except ValueError:
        raise ConfigError("the agent-trust CA is not a PEM certificate") from None
    base = system_bundle(environ).read_bytes()
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    files = TrustFiles(directory / BUNDLE_FILE, directory / CA_FILE)
    joined = base if base.endswith(b"\n") else base + b"\n"
    _write(files.bundle, joined + b"# meshgate agent trust CA\n" + agent_ca_pem)
    _write(files.ca, agent_ca_pem)
    return files


def trust_environment(bundle: str | Path, ca: str | Path) -> dict[str, str]:
    """The variables pointing common runtimes at the bundle (or, for Node.js and Deno, at the
    extra CA). Paths as strings, so the injector can name paths inside a container."""
    env = {name: str(bundle) for name in BUNDLE_VARIABLES}
    env.update({name: str(ca) for name in EXTRA_CA_VARIABLES})
    return env


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o644)  # O_CREAT's mode is masked by the umask
    os.replace(tmp, path)
