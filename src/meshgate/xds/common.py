"""Small builders shared by the gateway and sidecar translators."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import (
    address_pb2,
    config_source_pb2,
    extension_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2 as core_extension_pb2
from xds.type.matcher.v3 import matcher_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def ads() -> config_source_pb2.ConfigSource:
    """Fetch a dependent resource over the same ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def single_endpoint(name: str, host: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    """A cluster's one endpoint: a destination address, the gateway, the xDS server."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=socket_address(host, port)
                        )
                    )
                ]
            )
        ],
    )


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def router_filter() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
    )


def stdout_access_log() -> accesslog_pb2.AccessLog:
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout", typed_config=pack(stream_pb2.StdoutAccessLog())
    )


def json_body(fields: dict[str, str]) -> substitution_format_string_pb2.SubstitutionFormatString:
    """A small JSON body; values may use Envoy's %COMMAND% substitutions."""
    body = struct_pb2.Struct()
    body.update(fields)
    return substitution_format_string_pb2.SubstitutionFormatString(
        json_format=body, content_type="application/json"
    )


def json_refusal(status: int, fields: dict[str, str]) -> route_components_pb2.DirectResponseAction:
    return route_components_pb2.DirectResponseAction(status=status, body_format=json_body(fields))


def connect_upgrade() -> hcm_pb2.HttpConnectionManager.UpgradeConfig:
    """Accept HTTP CONNECT on this connection manager (routes decide what happens to it)."""
    return hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")


def only_for_authorities(
    name: str, typed_config: any_pb2.Any, authorities: tuple[str, ...]
) -> hcm_pb2.HttpFilter:
    """An HTTP filter that Envoy skips unless the request's :authority is one of `authorities`
    (as Envoy picks virtual hosts: `authority_value`).

    For filters without per-route configuration (the MCP parser, its body buffer) that must
    act on some destinations' traffic only. Not for a filter that adds a secret: a wildcard
    also matches a name under it that another destination names exactly.
    """
    one_of = matcher_pb2.Matcher.MatcherList.Predicate(
        or_matcher=matcher_pb2.Matcher.MatcherList.Predicate.PredicateList(
            predicate=[
                matcher_pb2.Matcher.MatcherList.Predicate(
                    single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                        input=header_input(":authority"),
                        value_match=authority_value(value),
                    )
                )
                for value in authorities
            ]
        )
    )
    if len(authorities) == 1:  # an or_matcher needs two or more predicates
        one_of = one_of.or_matcher.predicate[0]
    skip_others = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(
            matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate(not_matcher=one_of),
                    on_match=matcher_pb2.Matcher.OnMatch(
                        action=core_extension_pb2.TypedExtensionConfig(
                            name="skip", typed_config=pack(skip_action_pb2.SkipFilter())
                        )
                    ),
                )
            ]
        )
    )
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=skip_others,
        extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=typed_config),
    )
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(wrapped))


def authority_value(authority: str) -> xds_string_pb2.StringMatcher:
    """Matches what Envoy's virtual host for the domain `authority` matches: in any case, and a
    wildcard (`*.example.com`, `*.example.com:443`) as a suffix. A name under the wildcard that
    another destination names exactly matches too (Envoy would pick that destination's host)."""
    if authority.startswith("*."):
        return xds_string_pb2.StringMatcher(suffix=authority[1:], ignore_case=True)
    return xds_string_pb2.StringMatcher(exact=authority, ignore_case=True)


def http_listener(
    name: str, host: str, port: int, hcm: hcm_pb2.HttpConnectionManager
) -> listener_pb2.Listener:
    """A listener whose one filter chain is the given HTTP connection manager."""
    return listener_pb2.Listener(
        name=name,
        address=socket_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=pack(hcm),
                    )
                ]
            )
        ],
    )


def authority_matcher(
    table: Mapping[str, matcher_pb2.Matcher.OnMatch],
) -> matcher_pb2.Matcher:
    """Pick by the request's authority: a hash lookup, then (only on a miss) a case-insensitive
    list, because Envoy picks virtual hosts case-insensitively and `Host: Billing.internal`
    must not reach an allow route while skipping the filter meant for it.

    Exact names only: a wildcard key (`*.example.com`) matches no request. Matching it as a
    suffix here would also pick it for a name under it that another destination, absent from
    `table`, names exactly: a credential would then reach that destination's upstream."""
    authority = header_input(":authority")
    any_case = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(
            matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate(
                        single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                            input=authority,
                            value_match=xds_string_pb2.StringMatcher(exact=key, ignore_case=True),
                        )
                    ),
                    on_match=on_match,
                )
                for key, on_match in table.items()
            ]
        )
    )
    exact = header_exact_match(":authority", table)
    exact.on_no_match.matcher.CopyFrom(any_case)
    return exact


def header_exact_match(
    header: str, table: Mapping[str, matcher_pb2.Matcher.OnMatch]
) -> matcher_pb2.Matcher:
    """A hash lookup on one request header's value."""
    return matcher_pb2.Matcher(
        matcher_tree=matcher_pb2.Matcher.MatcherTree(
            input=header_input(header),
            exact_match_map=matcher_pb2.Matcher.MatcherTree.MatchMap(map=table),
        )
    )


def header_input(header: str) -> core_extension_pb2.TypedExtensionConfig:
    return core_extension_pb2.TypedExtensionConfig(
        name=header.lstrip(":"),
        typed_config=pack(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)),
    )
