"""The gateway's own route table, evaluated in Python for one recorded request. Pure.

The replay does not re-implement policy semantics: it takes the RouteConfiguration that
`xds.gateway.egress_routes_encoded` builds for the candidate policy (the bytes gateways get over
RDS, parsed back) and does what Envoy's router does with it: pick the virtual host by :authority,
then the first route whose RouteMatch matches, and read the decision from the route's name
(`xds.access_log.route_decision`, as audit ingest does). Only the matcher features the
translation emits are implemented; anything else raises `UnsupportedMatch` when the table is
loaded, so a new matcher in the translation fails the replay loudly instead of being ignored.

A request is what an audit record holds: the agent header value, host, method, path, the MCP
filter's method and tool, and whether it had a body (`bytes_received > 0`, which stands in for
the Content-Length header the body-less MCP routes look at). A header the record does not hold
(a rule's `headers:` condition) makes a route's match unknown: the result is then every decision
the request could get (`Verdict.undecided`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2

from meshgate.policy.model import PolicyModel
from meshgate.xds.access_log import RouteDecision, route_decision
from meshgate.xds.allowlist import AGENT_HEADER, MCP_FILTER
from meshgate.xds.gateway import egress_routes_encoded


class UnsupportedMatch(Exception):
    """The route table uses a matcher feature the replay does not evaluate."""


@dataclass(frozen=True)
class Request:
    """The request fields an audit record holds. `agent`: the agent header value the gateway
    routed on (the SPIFFE ID with mTLS, else the name the sidecar stamped; "" when absent)."""

    agent: str
    host: str
    method: str
    path: str
    mcp_method: str = ""
    mcp_tool: str = ""
    has_body: bool = False


NO_ROUTE = RouteDecision("", "denied", "no_route")


@dataclass(frozen=True)
class Verdict:
    """What the table decides. `decisions`: one for a decided request; several when the
    first matching route depends on headers not recorded (`unknown_headers`)."""

    decisions: tuple[RouteDecision, ...]
    routes: tuple[str, ...]
    unknown_headers: tuple[str, ...] = ()

    @property
    def decision(self) -> RouteDecision:
        return self.decisions[0]

    @property
    def undecided(self) -> bool:
        return len({(d.decision, d.reason) for d in self.decisions}) > 1


# A condition on a request: True, False, or None (it reads a header the record does not hold).
Check = Callable[[Request], bool | None]

# Request headers a record tells: the agent header, the method, and the body's framing.
_KNOWN_HEADERS = frozenset({AGENT_HEADER, ":method", "content-length", "transfer-encoding"})


def _header_value(request: Request, name: str) -> str | None:
    if name == AGENT_HEADER:
        return request.agent or None
    if name == ":method":
        return request.method
    if name == "content-length":
        # the buffer filter sets Content-Length on every body it read (chunked ones too)
        return "1" if request.has_body else None
    if name == "transfer-encoding":
        return None  # after buffering, a body is framed by its Content-Length
    raise AssertionError(name)


def _string_matcher(m: string_pb2.StringMatcher, where: str) -> Callable[[str], bool]:
    _only(m, {"exact", "safe_regex"}, where)
    kind = m.WhichOneof("match_pattern")
    if kind == "exact":
        exact = m.exact
        return lambda value: value == exact
    if kind == "safe_regex":
        _only(m.safe_regex, {"regex"}, where + ".safe_regex")
        pattern = re.compile(m.safe_regex.regex)  # Envoy's RE2 also matches the whole value
        return lambda value: pattern.fullmatch(value) is not None
    raise UnsupportedMatch(f"{where}: string matcher {kind!r}")


def _only(message: object, allowed: set[str], where: str) -> None:
    """Fail loudly on any set field the replay does not evaluate."""
    fields = {f.name for f, _ in message.ListFields()}  # type: ignore[attr-defined]
    extra = fields - allowed
    if extra:
        raise UnsupportedMatch(f"{where}: unsupported field(s) {', '.join(sorted(extra))}")


def _header_check(h: rc.HeaderMatcher, where: str) -> tuple[Check, str | None]:
    """Envoy's HeaderUtility semantics for the fields the translation sets; the name of a
    header the record does not hold (its check is then unknown)."""
    _only(
        h,
        {"name", "string_match", "present_match", "invert_match", "treat_missing_header_as_empty"},
        where,
    )
    name, invert, missing_empty = h.name.lower(), h.invert_match, h.treat_missing_header_as_empty
    kind = h.WhichOneof("header_match_specifier")
    if kind not in ("present_match", "string_match"):
        raise UnsupportedMatch(f"{where}: header matcher {kind!r}")
    match = None
    if kind == "string_match":
        match = _string_matcher(h.string_match, where + ".string_match")
    if name not in _KNOWN_HEADERS:  # checked all the same: a new matcher kind fails here too
        return (lambda request: None), name
    if match is None:
        present = h.present_match

        def check_present(request: Request) -> bool:
            value = _header_value(request, name)
            if value is None and not missing_empty:
                # Envoy: an absent header matches only a "present" matcher that is inverted
                # (present_match: true) or not (present_match: false)
                return bool(present) if invert else not present
            return bool(present != invert)

        return check_present, None
    matches = match

    def check_value(request: Request) -> bool:
        value = _header_value(request, name)
        if value is None:
            if not missing_empty:
                return False
            value = ""
        return bool(matches(value) != invert)

    return check_value, None


def _metadata_value(request: Request, path: tuple[str, ...]) -> str | None:
    """The MCP filter's dynamic metadata as the record tells it ("" fields: not set)."""
    if path == ("method",):
        return request.mcp_method or None
    if path == ("params", "name"):
        return request.mcp_tool or None
    raise UnsupportedMatch(f"metadata path {'.'.join(path)} is not recorded")


def _metadata_check(m: metadata_pb2.MetadataMatcher, where: str) -> Check:
    _only(m, {"filter", "path", "value", "invert"}, where)
    if m.filter != MCP_FILTER:
        raise UnsupportedMatch(f"{where}: metadata of filter {m.filter!r} is not recorded")
    path = tuple(segment.key for segment in m.path)
    _metadata_value(Request("", "", "", ""), path)  # an unrecorded path fails here, at load
    value_matcher: value_pb2.ValueMatcher = m.value
    _only(value_matcher, {"string_match", "present_match"}, where + ".value")
    kind = value_matcher.WhichOneof("match_pattern")
    invert = m.invert
    if kind == "present_match":
        if not value_matcher.present_match:
            raise UnsupportedMatch(f"{where}: present_match: false")

        def check_present(request: Request) -> bool:
            return bool((_metadata_value(request, path) is not None) != invert)

        return check_present
    if kind == "string_match":
        match = _string_matcher(value_matcher.string_match, where + ".value.string_match")

        def check_value(request: Request) -> bool:
            value = _metadata_value(request, path)
            return bool((value is not None and match(value)) != invert)

        return check_value
    raise UnsupportedMatch(f"{where}: value matcher {kind!r}")


@dataclass(frozen=True)
class _Route:
    name: str
    decision: RouteDecision
    checks: tuple[Check, ...]
    unknown: tuple[str, ...]  # headers this route reads that records do not hold

    def matches(self, request: Request) -> bool | None:
        unknown = False
        for check in self.checks:
            result = check(request)
            if result is False:
                return False
            if result is None:
                unknown = True
        return None if unknown else True


def _path_check(match: rc.RouteMatch, where: str) -> Check:
    """prefix / path (case-sensitive, on the path without query: records hold no query) or a
    CONNECT request (`connect_matcher`; a CONNECT has no :path, so no path route matches it)."""
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix":
        prefix = match.prefix
        return lambda r: r.method != "CONNECT" and r.path.startswith(prefix)
    if kind == "path":
        path = match.path
        return lambda r: r.method != "CONNECT" and r.path == path
    if kind == "connect_matcher":
        return lambda r: r.method == "CONNECT"
    raise UnsupportedMatch(f"{where}: path specifier {kind!r}")


def _compile_route(route: rc.Route, where: str) -> _Route:
    decision = route_decision(route.name)
    if decision is None:
        raise UnsupportedMatch(f"{where}: route name {route.name!r} says no decision")
    match = route.match
    _only(match, {"prefix", "path", "connect_matcher", "headers", "dynamic_metadata"}, where)
    _only(match.connect_matcher, set(), where + ".connect_matcher")
    checks: list[Check] = [_path_check(match, where)]
    unknown: list[str] = []
    for i, h in enumerate(match.headers):
        check, name = _header_check(h, f"{where}.headers[{i}]")
        checks.append(check)
        if name is not None:
            unknown.append(name)
    checks.extend(
        _metadata_check(m, f"{where}.dynamic_metadata[{i}]")
        for i, m in enumerate(match.dynamic_metadata)
    )
    return _Route(route.name, decision, tuple(checks), tuple(unknown))


def _compile_domain(domain: str, where: str) -> str:
    if domain != "*" and "*" in domain:
        raise UnsupportedMatch(f"{where}: wildcard domain {domain!r}")
    return domain.lower()


# What a virtual host may carry besides routes: nothing else changes which route is chosen.
_VHOST_FIELDS = (
    "name",
    "domains",
    "routes",
    "request_headers_to_remove",
    "typed_per_filter_config",
)


class RouteTable:
    """One RouteConfiguration, compiled once; `evaluate` is Envoy's route selection."""

    def __init__(self, config: route_pb2.RouteConfiguration) -> None:
        _only(
            config,
            {"name", "virtual_hosts", "response_headers_to_add"},
            f"route table {config.name}",
        )
        self._hosts: dict[str, tuple[_Route, ...]] = {}
        self._default: tuple[_Route, ...] | None = None
        for vhost in config.virtual_hosts:
            where = f"virtual host {vhost.name}"
            _only(
                vhost,
                {
                    "name",
                    "domains",
                    "routes",
                    "request_headers_to_remove",
                    "typed_per_filter_config",
                },
                where,
            )
            routes = tuple(
                _compile_route(r, f"{where} route {r.name or i}")
                for i, r in enumerate(vhost.routes)
            )
            for domain in vhost.domains:
                key = _compile_domain(domain, where)
                if key == "*":
                    if self._default is not None:
                        raise UnsupportedMatch(f"{where}: a second '*' virtual host")
                    self._default = routes
                elif key in self._hosts:
                    raise UnsupportedMatch(f"{where}: domain {domain!r} twice")
                else:
                    self._hosts[key] = routes

    def evaluate(self, request: Request) -> Verdict:
        """Exact domains (case-insensitive, port included as sent), else `*`; first match."""
        routes = self._hosts.get(request.host.lower(), self._default) or ()
        decisions: list[RouteDecision] = []
        names: list[str] = []
        unknown: list[str] = []
        for route in routes:
            matched = route.matches(request)
            if matched is False:
                continue
            decisions.append(route.decision)
            names.append(route.name)
            if matched:
                break
            unknown.extend(h for h in route.unknown if h not in unknown)
        else:
            decisions.append(NO_ROUTE)
            names.append("")
        return Verdict(tuple(decisions), tuple(names), tuple(unknown))


def assumed_secrets(model: PolicyModel) -> Mapping[str, str]:
    """Every credential present: whether a secret exists at the gateway is a runtime input,
    not policy (a missing one is the `no-credential` route, which replay does not predict)."""
    return {d.credentials.secret: "" for d in model.destinations if d.credentials is not None}


class PolicyRoutes:
    """A policy's gateway route tables: with mTLS (agents named by SPIFFE ID) and without
    (agents named by the header their sidecar stamped), each built when first needed."""

    def __init__(self, model: PolicyModel) -> None:
        self.model = model
        self._tables: dict[bool, RouteTable] = {}

    def table(self, mtls: bool) -> RouteTable:
        table = self._tables.get(mtls)
        if table is None:
            domain = self.model.mesh.trust_domain if mtls else None
            # the very bytes a gateway is sent over RDS, read back
            encoded = egress_routes_encoded(self.model, assumed_secrets(self.model), domain)
            config = route_pb2.RouteConfiguration.FromString(encoded.payload)
            table = self._tables[mtls] = RouteTable(config)
        return table

    def evaluate(self, request: Request) -> Verdict:
        return self.table(request.agent.startswith("spiffe://")).evaluate(request)
