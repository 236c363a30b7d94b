"""Small builders shared by the gateway and sidecar translators."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

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
from xds.type.matcher.v3 import regex_pb2 as xds_regex_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2

from meshgate.policy.model import Destination


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


Predicate: TypeAlias = matcher_pb2.Matcher.MatcherList.Predicate


def _authority_is(value: xds_string_pb2.StringMatcher) -> Predicate:
    return Predicate(
        single_predicate=Predicate.SinglePredicate(
            input=header_input(":authority"), value_match=value
        )
    )


def _any_of(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:  # an or_matcher needs two or more predicates
        return predicates[0]
    return Predicate(or_matcher=Predicate.PredicateList(predicate=predicates))


def _regex(pattern: str) -> xds_string_pb2.StringMatcher:
    return xds_string_pb2.StringMatcher(
        safe_regex=xds_regex_pb2.RegexMatcher(
            google_re2=xds_regex_pb2.RegexMatcher.GoogleRE2(), regex=pattern
        )
    )


def _names(dest: Destination) -> tuple[str, str]:
    return dest.host, f"{dest.host}:{dest.port}"


def destination_predicate(dest: Destination, every: Sequence[Destination]) -> Predicate:
    """The requests Envoy routes to `dest`'s virtual host (in any case), a wildcard's one label
    under it only where no other destination of `every` names that host exactly."""
    if not dest.host.startswith("*."):
        return _any_of(
            [
                _authority_is(xds_string_pb2.StringMatcher(exact=n, ignore_case=True))
                for n in _names(dest)
            ]
        )
    one_label = _authority_is(_regex(one_label_regex(dest.host, dest.port)))
    suffix = dest.host[1:]
    taken = [
        _authority_is(xds_string_pb2.StringMatcher(exact=n, ignore_case=True))
        for other in every
        if not other.host.startswith("*.") and other.host.endswith(suffix)
        for n in _names(other)
    ]
    if not taken:
        return one_label
    return Predicate(
        and_matcher=Predicate.PredicateList(
            predicate=[one_label, Predicate(not_matcher=_any_of(taken))]
        )
    )


def only_for_destinations(
    filters: Sequence[tuple[str, any_pb2.Any]],
    chosen: Sequence[Destination],
    every: Sequence[Destination],
) -> list[hcm_pb2.HttpFilter]:
    """HTTP filters (name, config) that Envoy skips unless the request is for one of `chosen`,
    as Envoy picks virtual hosts (`destination_predicate`; `every`: the policy's destinations),
    sharing one condition.

    For filters without per-route configuration (the MCP parser, its body buffer) that must
    act on some destinations' traffic only: a name under a wildcard that another destination
    names exactly is that destination's traffic, not the wildcard's."""
    run = _any_of([destination_predicate(d, every) for d in chosen])
    skip_others = matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(
            matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=Predicate(not_matcher=run), on_match=_skip()
                )
            ]
        )
    )
    return [
        hcm_pb2.HttpFilter(
            name=name,
            typed_config=pack(
                extension_matcher_pb2.ExtensionWithMatcher(
                    xds_matcher=skip_others,
                    extension_config=extension_pb2.TypedExtensionConfig(
                        name=name, typed_config=typed_config
                    ),
                )
            ),
        )
        for name, typed_config in filters
    ]


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


def re2_escape(text: str) -> str:
    """RE2-safe escaping of a host name (letters, digits, '-', '.')."""
    return "".join("\\" + c if not (c.isalnum() or c == "-") else c for c in text)


def host_regex(host: str) -> str:
    """RE2 for the names a destination host stands for: itself, or for a wildcard
    (`*.example.com`) one whole label under it."""
    return "[^.:]+" + re2_escape(host[1:]) if host.startswith("*.") else re2_escape(host)


def one_label_regex(wildcard: str, port: int) -> str:
    """RE2 for the authorities a wildcard destination (`*.example.com`) stands for: one label
    under it, with or without its port, in any case (the gateway refuses deeper names)."""
    return rf"(?i){host_regex(wildcard)}(:{port})?"


def _skip() -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=core_extension_pb2.TypedExtensionConfig(
            name="skip", typed_config=pack(skip_action_pb2.SkipFilter())
        )
    )


def _first_of(
    pairs: list[tuple[xds_string_pb2.StringMatcher, matcher_pb2.Matcher.OnMatch]],
) -> matcher_pb2.Matcher:
    authority = header_input(":authority")
    return matcher_pb2.Matcher(
        matcher_list=matcher_pb2.Matcher.MatcherList(
            matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate(
                        single_predicate=matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
                            input=authority, value_match=value
                        )
                    ),
                    on_match=on_match,
                )
                for value, on_match in pairs
            ]
        )
    )


def authority_matcher(
    table: Mapping[Destination, matcher_pb2.Matcher.OnMatch],
    destinations: Sequence[Destination],
) -> matcher_pb2.Matcher:
    """Pick by the request's authority the way Envoy picks the destination's virtual host:
    `table` maps a destination to what to do for its requests. A hash lookup on exact names, then
    (only on a miss) the same names in any case, since `Host: Billing.internal` must not reach
    an allow route while skipping the filter meant for it; then, only for names no destination
    names exactly, the wildcards (`*.example.com`: one label under it).

    Every exact destination name of `destinations` absent from `table` is skipped first: a name
    under a wildcard that another destination names exactly belongs to that one, and a
    credential must never reach its upstream."""
    exact: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    wildcards: list[tuple[xds_string_pb2.StringMatcher, matcher_pb2.Matcher.OnMatch]] = []
    for dest, on_match in table.items():
        if dest.host.startswith("*."):
            wildcards.append((_regex(one_label_regex(dest.host, dest.port)), on_match))
        else:
            for name in _names(dest):
                exact[name] = on_match
    skip = _skip()
    for dest in destinations:
        if not dest.host.startswith("*."):
            for name in _names(dest):
                exact.setdefault(name, skip)
    any_case = _first_of(
        [(xds_string_pb2.StringMatcher(exact=k, ignore_case=True), m) for k, m in exact.items()]
        + wildcards  # after every exact name: a list's first match wins
    )
    tree = header_exact_match(":authority", exact)
    tree.on_no_match.matcher.CopyFrom(any_case)
    return tree


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
