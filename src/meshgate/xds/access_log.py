"""What the gateway logs for the audit trail, and how each route says what it decided.

Every route carries constant metadata under `meshgate` (destination, decision, reason), so route
bytes stay cacheable. The policy version is added once, at RouteConfiguration level, as the
response header `x-meshgate-policy` (it also tells the agent which commit decided); Envoy adds
it to routed, direct and local (429, 503) responses alike. The agent header is copied into
dynamic metadata before routing because the gateway strips it before forwarding upstream.

Each request becomes one JSON line in the spool, a file relative to Envoy's working directory
(the launcher's per-gateway state directory); the `meshgate gateway` process ships it.
"""

from __future__ import annotations

import functools

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2 as h2m
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from google.protobuf import struct_pb2

from meshgate.xds.common import pack

SPOOL_FILE = "audit-spool.jsonl"  # relative: resolved in Envoy's working directory
POLICY_HEADER = "x-meshgate-policy"
METADATA_KEY = "meshgate"
AGENT_METADATA_FILTER = "meshgate.agent-to-metadata"
REQUEST_ID_HEADER = "x-request-id"

# One spool line per request. Keys are the contract with `meshgate.audit.ingest`. Kept lean:
# JSON formatting is the gateway's main per-request logging cost.
SPOOL_FORMAT: dict[str, str] = {
    "start": "%START_TIME(%s.%6f)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "agent": f"%DYNAMIC_METADATA({METADATA_KEY}:agent):256%",
    "spiffe_id": "%DOWNSTREAM_PEER_URI_SAN%",
    # the route's whole `meshgate` metadata as one object: one lookup, not three
    "route": f"%METADATA(ROUTE:{METADATA_KEY})%",
    "policy_version": f"%RESP({POLICY_HEADER})%",
    "authority": "%REQ(:AUTHORITY):512%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):2048%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
}


def spool_access_log(
    path: str = SPOOL_FILE, only: accesslog_pb2.AccessLogFilter | None = None
) -> accesslog_pb2.AccessLog:
    """`only`: log just the requests this filter matches (default: every request)."""
    fmt = struct_pb2.Struct()
    fmt.update(SPOOL_FORMAT)
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.file",
        filter=only,
        typed_config=pack(
            file_pb2.FileAccessLog(
                path=path,
                log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=fmt),
            )
        ),
    )


# A sidecar answers by itself only when the gateway cannot be reached: these flags.
GATEWAY_UNREACHABLE_FLAGS = ("UF", "UH", "UO", "URX", "NC", "DF")


def sidecar_spool_access_log() -> accesslog_pb2.AccessLog:
    """A sidecar's spool: only what it refused itself (the gateway logs everything else)."""
    unreachable = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=list(GATEWAY_UNREACHABLE_FLAGS))
    )
    return spool_access_log(only=unreachable)


@functools.lru_cache(maxsize=10_000)
def route_metadata(destination: str, decision: str, reason: str = "") -> base_pb2.Metadata:
    """What a route decides, for the audit log: constant per route, so routes stay cacheable.

    Shared (memoised): callers copy it into their routes and never mutate it."""
    fields = struct_pb2.Struct()
    fields.update({"destination": destination, "decision": decision})
    if reason:  # allow routes (most of them) carry no reason: smaller route tables
        fields["reason"] = reason
    return base_pb2.Metadata(filter_metadata={METADATA_KEY: fields})


def agent_to_metadata_filter(agent_header: str) -> hcm_pb2.HttpFilter:
    """Copy the agent header into dynamic metadata before routing strips it from the request."""
    config = h2m.Config(
        request_rules=[
            h2m.Config.Rule(
                header=agent_header,
                on_header_present=h2m.Config.KeyValuePair(
                    metadata_namespace=METADATA_KEY, key="agent"
                ),
            )
        ]
    )
    return hcm_pb2.HttpFilter(name=AGENT_METADATA_FILTER, typed_config=pack(config))


def policy_version_header(version: str) -> base_pb2.HeaderValueOption:
    """Overwrites any upstream header of that name: only the gateway says which policy decided."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=POLICY_HEADER, value=version),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def drop_client_request_id() -> extension_pb2.TypedExtensionConfig:
    """The agent cannot pick its request id (the audit key): Envoy generates a fresh one."""
    mutation = header_mutation_pb2.HeaderMutation(
        mutations=[mutation_rules_pb2.HeaderMutation(remove=REQUEST_ID_HEADER)]
    )
    return extension_pb2.TypedExtensionConfig(
        name="meshgate.drop-client-request-id", typed_config=pack(mutation)
    )


def audit_connection_manager(hcm: hcm_pb2.HttpConnectionManager, agent_header: str) -> None:
    """Turn on audit logging for a gateway's connection manager (in place)."""
    hcm.access_log.append(spool_access_log())
    hcm.early_header_mutation_extensions.insert(0, drop_client_request_id())
    hcm.always_set_request_id_in_response = True
    hcm.http_filters.insert(0, agent_to_metadata_filter(agent_header))
