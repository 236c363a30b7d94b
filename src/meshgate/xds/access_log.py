"""What the gateway logs for the audit trail, and how each route says what it decided.

Every route's name says what it decides (`route_decision` reads it back), so the log needs
only `%ROUTE_NAME%`, a plain string copy per request, and route bytes stay cacheable. The
policy version is added once, at RouteConfiguration level, as the
response header `x-meshgate-policy` (it also tells the agent which commit decided); Envoy adds
it to routed, direct and local (429, 503) responses alike. The gateway strips the agent
header before forwarding upstream, so allow routes carry their agent in their name.

Each request becomes one JSON line in the spool, a file relative to Envoy's working directory
(the launcher's per-gateway state directory); the `meshgate gateway` process ships it.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from google.protobuf import struct_pb2

from meshgate.xds.common import pack

SPOOL_FILE = "audit-spool.jsonl"  # relative: resolved in Envoy's working directory
POLICY_HEADER = "x-meshgate-policy"
METADATA_KEY = "meshgate"  # namespace of the ALS tags and metadata an ingested line becomes
REQUEST_ID_HEADER = "x-request-id"

# One spool line per request. Keys are the contract with `meshgate.audit.ingest`. Kept lean:
# JSON formatting is the gateway's main per-request logging cost.
PACER_METADATA = "meshgate.pacer"  # pacing.spec.DYNAMIC_METADATA_NAMESPACE
SPOOL_FORMAT: dict[str, str] = {
    "start": "%START_TIME(%s.%6f)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    # deny routes and local replies keep the agent header (only forwarding strips it); allow
    # routes carry their agent in their name
    "agent": "%REQ(X-MESHGATE-AGENT):256%",
    "spiffe_id": "%DOWNSTREAM_PEER_URI_SAN%",
    # what the route decided, in its name (see `route_decision`): a string copy, no lookups
    "route": "%ROUTE_NAME%",
    "policy_version": f"%RESP({POLICY_HEADER})%",
    "authority": "%REQ(:AUTHORITY):512%",
    "method": "%REQ(:METHOD)%",
    # the whole path the rules matched and the upstream got (normalised; never cut: the gateway
    # refuses paths over 8 KiB, and Envoy's header limit bounds what it refuses). Not
    # x-envoy-original-path: the gateway rewrites no path, and an agent can send that header.
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
    # what the MCP filter read from a JSON-RPC body (absent for other requests)
    "mcp_method": "%DYNAMIC_METADATA(envoy.filters.http.mcp:method):256%",
    "mcp_tool": "%DYNAMIC_METADATA(envoy.filters.http.mcp:params:name):256%",
    # what the gateway's pacer read from an LLM call, and the budget that refused one
    "model": f"%DYNAMIC_METADATA({PACER_METADATA}:model):256%",
    "tokens_in": f"%DYNAMIC_METADATA({PACER_METADATA}:tokens_in)%",
    "tokens_out": f"%DYNAMIC_METADATA({PACER_METADATA}:tokens_out)%",
    "cost_micro_usd": f"%DYNAMIC_METADATA({PACER_METADATA}:cost_micro_usd)%",
    "budget": f"%DYNAMIC_METADATA({PACER_METADATA}:budget):256%",
    "mcp_args_digest": f"%DYNAMIC_METADATA({PACER_METADATA}:mcp_args_digest):80%",
    # what shadow mode's tool rules would have refused (the pacer read the call)
    "shadow_refused": f"%DYNAMIC_METADATA({PACER_METADATA}:shadow_refused):256%",
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


# Route names, the contract between the routes the gateway gets and the audit records:
#   allow/<agent>/<destination>/<rule>/<n>   allowed (rate-limited and upstream failures are
#                                            told by the status and response flags)
#   deny/<destination>, deny-connect/<destination>   denied: egress_denied
#   unknown-destination                      denied: unknown_destination
#   deny-tool/<destination>                  denied: tool_denied (an MCP tools/call not allowed)
#   deny-tool/<destination>/<agent>          denied: tool_denied (the same, for an agent with
#                                            tool rules: its pacer answers MCP's way)
#   mcp-unparsed/<destination>               denied: mcp_unparsed (a body the MCP filter did
#                                            not read, on a destination with tool rules)
#   no-credential/<destination>              upstream_error: credential_unavailable
# Agent and destination names are DNS labels, so "/" never occurs inside one.
UNKNOWN_DESTINATION_ROUTE = "unknown-destination"


@dataclass(frozen=True)
class RouteDecision:
    destination: str
    decision: str
    reason: str = ""
    agent: str = ""


def allow_route_name(agent: str, destination: str, rule: int, suffix: str | int) -> str:
    return f"allow/{agent}/{destination}/{rule}/{suffix}"


def agent_tool_refusal_name(destination: str, agent: str) -> str:
    return f"deny-tool/{destination}/{agent}"


def route_decision(name: str) -> RouteDecision | None:
    """What the route of this name decided; None for a name that is not meshgate's."""
    parts = name.split("/")
    match parts:
        case ["allow", agent, destination, _, _]:
            return RouteDecision(destination, "allowed", agent=agent)
        case ["deny" | "deny-connect", destination]:
            return RouteDecision(destination, "denied", "egress_denied")
        case ["deny-tool", destination]:
            return RouteDecision(destination, "denied", "tool_denied")
        case ["deny-tool", destination, agent]:
            return RouteDecision(destination, "denied", "tool_denied", agent=agent)
        case ["mcp-unparsed", destination]:
            return RouteDecision(destination, "denied", "mcp_unparsed")
        case ["unknown-destination"]:
            return RouteDecision("", "denied", "unknown_destination")
        case ["no-credential", destination]:
            return RouteDecision(destination, "upstream_error", "credential_unavailable")
    return None


# Refusals the gateway's filters make before (or instead of) a route's answer, by Envoy's response
# code details. The route then may be an allow route, so these decide first (`local_refusal`).
RBAC_DENIED = "rbac_access_denied_matched_policy"
PATH_TOO_LONG = "path-too-long"  # RBAC policy names in the gateway's filters
PATH_NOT_CANONICAL = "path-not-canonical"
BODY_GUARD_POLICY = "mcp-body-unparsed"
LOCAL_REFUSALS: dict[str, str] = {
    f"{RBAC_DENIED}[{PATH_TOO_LONG}]": "path_too_long",
    f"{RBAC_DENIED}[{PATH_NOT_CANONICAL}]": "path_not_canonical",
    "path_normalization_failed": "path_not_canonical",  # Envoy: an escaped slash or backslash
    f"{RBAC_DENIED}[{BODY_GUARD_POLICY}]": "mcp_unparsed: a body on a request routed as body-less",
    "request_payload_too_large": "body_too_large",  # over the MCP hosts' body limit
    # the pacer's MCP refusals (pacing.spec), made on an allow route
    "tool_denied": "tool_denied",
    "argument_refused": "argument_refused",
    "jsonrpc_unreadable": "mcp_unparsed: not one strict JSON-RPC message",
    "jsonrpc_header_mismatch": "mcp_header_mismatch",
}


def local_refusal(details: str) -> str | None:
    """The audit reason of a refusal the gateway's filters made (None: not one of them)."""
    if details in LOCAL_REFUSALS:
        return LOCAL_REFUSALS[details]
    if details.startswith("mcp_"):  # the MCP filter refused the body (not JSON, ...)
        return f"mcp_unparsed: {details}"
    return None


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


def audit_connection_manager(hcm: hcm_pb2.HttpConnectionManager) -> None:
    """Turn on audit logging for a gateway's connection manager (in place)."""
    hcm.access_log.append(spool_access_log())
    hcm.early_header_mutation_extensions.insert(0, drop_client_request_id())
    hcm.always_set_request_id_in_response = True
