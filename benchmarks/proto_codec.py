"""Compare two Python codecs for Envoy's xDS API on one large RouteConfiguration.

meshgate builds its xDS resources with ``xds-protos`` (gRPC's generated Envoy API on
Google ``protobuf``, normally backed by the upb C extension) rather than with
``envoy-data-plane`` (the same API generated as betterproto2 dataclasses with pydantic
validation, encoded and decoded in pure Python). This script records the reason: it builds
the *same* ``envoy.config.route.v3.RouteConfiguration`` with both libraries and measures

* build     -- time to construct the message tree from plain Python values;
* serialise -- time to encode the message to wire bytes;
* parse     -- time to decode each library's own bytes back into its message type;

each as the best and the median of ``--repeat`` runs (the garbage collector is switched off
while a run is timed, as ``timeit`` does), plus the size of the encoded message and the
time of the first import of each library's ``route.v3`` module (a single sample).

It also checks that the two libraries agree: envoy-data-plane's bytes are parsed with
xds-protos and compared with ``==`` to the xds-protos message, and the reverse is done with
envoy-data-plane. The benchmark fails (exit status 1) if either comparison differs. The bytes
themselves are not expected to be identical (same length, different field order): betterproto2
writes fields in declaration order (``Route.name``, field 14, first), upb in field-number
order; both are valid encodings of the same message.

Shape of the configuration (defaults: 500 virtual hosts, 5 routes each): virtual host ``N``
is ``hostN`` with the domains ``hostN.tools.example`` and ``hostN.tools.example:443``; its
routes alternate exact-path and prefix matches, every fifth route (from the second) matches
``:method`` exactly ``POST`` and every fifth (from the third) requires the header
``x-meshgate-agent`` to be present; every route goes to cluster ``dest-N`` with a 15.25 s
timeout, and the first route of each host disables ``envoy.filters.http.ext_authz`` through
``typed_per_filter_config`` (a ``FilterConfig`` packed in an ``Any``).

Usage::

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/proto_codec.py [--vhosts 500] [--routes 5] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLUSTER_PREFIX = "dest-"
DOMAIN_SUFFIX = ".tools.example"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
FILTER_CONFIG_TYPE_URL = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
TIMEOUT_SECONDS = 15
TIMEOUT_NANOS = 250_000_000
INSTALL_HINT = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class RouteSpec:
    """One route, as plain values that both builders turn into messages."""

    name: str
    path: str | None
    prefix: str | None
    method_post: bool
    agent_header: bool
    cluster: str
    disable_ext_authz: bool


@dataclass(frozen=True)
class VHostSpec:
    name: str
    domains: tuple[str, str]
    routes: tuple[RouteSpec, ...]


@dataclass(frozen=True)
class Timing:
    best: float
    median: float
    samples: list[float]


def make_spec(vhosts: int, routes: int) -> list[VHostSpec]:
    """Describe the route table once so both libraries build exactly the same thing."""
    hosts: list[VHostSpec] = []
    for n in range(vhosts):
        host = f"host{n}"
        specs: list[RouteSpec] = []
        for j in range(routes):
            exact = j % 2 == 0
            specs.append(
                RouteSpec(
                    name=f"{host}-r{j}",
                    path=f"/svc{j}/v1/call" if exact else None,
                    prefix=None if exact else f"/svc{j}/",
                    method_post=j % 5 == 1,
                    agent_header=j % 5 == 2,
                    cluster=f"{CLUSTER_PREFIX}{n}",
                    disable_ext_authz=j == 0,
                )
            )
        hosts.append(
            VHostSpec(
                name=host,
                domains=(f"{host}{DOMAIN_SUFFIX}", f"{host}{DOMAIN_SUFFIX}:443"),
                routes=tuple(specs),
            )
        )
    return hosts


# --------------------------------------------------------------------------- xds-protos


def build_xds(spec: list[VHostSpec], pb: Any) -> Any:
    """Build the RouteConfiguration with xds-protos (google.protobuf messages)."""
    rc, route_pb2, matcher_pb2, any_pb2, duration_pb2 = pb
    disable_any = any_pb2.Any(
        type_url=FILTER_CONFIG_TYPE_URL,
        value=rc.FilterConfig(disabled=True).SerializeToString(),
    )
    vhosts = []
    for vh in spec:
        routes = []
        for r in vh.routes:
            headers = []
            if r.method_post:
                headers.append(
                    rc.HeaderMatcher(
                        name=":method", string_match=matcher_pb2.StringMatcher(exact="POST")
                    )
                )
            if r.agent_header:
                headers.append(rc.HeaderMatcher(name="x-meshgate-agent", present_match=True))
            if r.path is not None:
                match = rc.RouteMatch(path=r.path, headers=headers)
            else:
                match = rc.RouteMatch(prefix=r.prefix, headers=headers)
            action = rc.RouteAction(
                cluster=r.cluster,
                timeout=duration_pb2.Duration(seconds=TIMEOUT_SECONDS, nanos=TIMEOUT_NANOS),
            )
            tpfc = {EXT_AUTHZ: disable_any} if r.disable_ext_authz else {}
            routes.append(
                rc.Route(name=r.name, match=match, route=action, typed_per_filter_config=tpfc)
            )
        vhosts.append(rc.VirtualHost(name=vh.name, domains=list(vh.domains), routes=routes))
    return route_pb2.RouteConfiguration(name="meshgate-egress", virtual_hosts=vhosts)


# ---------------------------------------------------------------------- envoy-data-plane


def build_edp(spec: list[VHostSpec], edp: Any) -> Any:
    """Build the RouteConfiguration with envoy-data-plane (betterproto2 dataclasses)."""
    route_v3, matcher_v3, gproto = edp
    disable_any = gproto.Any(
        type_url=FILTER_CONFIG_TYPE_URL, value=bytes(route_v3.FilterConfig(disabled=True))
    )
    timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS, microseconds=TIMEOUT_NANOS // 1000)
    vhosts = []
    for vh in spec:
        routes = []
        for r in vh.routes:
            headers = []
            if r.method_post:
                headers.append(
                    route_v3.HeaderMatcher(
                        name=":method", string_match=matcher_v3.StringMatcher(exact="POST")
                    )
                )
            if r.agent_header:
                headers.append(route_v3.HeaderMatcher(name="x-meshgate-agent", present_match=True))
            if r.path is not None:
                match = route_v3.RouteMatch(path=r.path, headers=headers)
            else:
                match = route_v3.RouteMatch(prefix=r.prefix, headers=headers)
            action = route_v3.RouteAction(cluster=r.cluster, timeout=timeout)
            tpfc = {EXT_AUTHZ: disable_any} if r.disable_ext_authz else {}
            routes.append(
                route_v3.Route(name=r.name, match=match, route=action, typed_per_filter_config=tpfc)
            )
        vhosts.append(route_v3.VirtualHost(name=vh.name, domains=list(vh.domains), routes=routes))
    return route_v3.RouteConfiguration(name="meshgate-egress", virtual_hosts=vhosts)


# ------------------------------------------------------------------------------ harness


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Timing, Any]:
    """Run ``fn`` ``repeat`` times with the GC off; return timings and the last result."""
    samples: list[float] = []
    result: Any = None
    for _ in range(repeat):
        result = None  # drop the previous result before timing the next run
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            result = fn()
            samples.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return Timing(min(samples), statistics.median(samples), samples), result


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build, serialise and parse one Envoy RouteConfiguration with xds-protos "
        "and with envoy-data-plane, and compare the times."
    )
    p.add_argument("--vhosts", type=int, default=500, help="virtual hosts (default 500)")
    p.add_argument("--routes", type=int, default=5, help="routes per virtual host (default 5)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per step (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    for name in ("vhosts", "routes", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    t0 = time.perf_counter()
    from envoy.config.route.v3 import route_components_pb2, route_pb2
    from envoy.type.matcher.v3 import string_pb2
    from google.protobuf import any_pb2, duration_pb2
    from google.protobuf.internal import api_implementation

    import_xds = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        from envoy_data_plane.envoy.config.route import v3 as edp_route_v3
        from envoy_data_plane.envoy.type.matcher import v3 as edp_matcher_v3
        from envoy_data_plane.google import protobuf as edp_gproto
    except ImportError as exc:
        print(
            f"error: envoy-data-plane is not importable ({exc}); run: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
    import_edp = time.perf_counter() - t0

    pb = (route_components_pb2, route_pb2, string_pb2, any_pb2, duration_pb2)
    edp = (edp_route_v3, edp_matcher_v3, edp_gproto)
    spec = make_spec(args.vhosts, args.routes)
    repeat: int = args.repeat
    wall0 = time.perf_counter()

    build_x, msg_x = timed(lambda: build_xds(spec, pb), repeat)
    build_e, msg_e = timed(lambda: build_edp(spec, edp), repeat)
    ser_x, data_x = timed(msg_x.SerializeToString, repeat)
    ser_e, data_e = timed(lambda: bytes(msg_e), repeat)
    parse_x, back_x = timed(lambda: route_pb2.RouteConfiguration.FromString(data_x), repeat)
    parse_e, back_e = timed(lambda: edp_route_v3.RouteConfiguration.parse(data_e), repeat)

    # Cross-check: each library must read the other's bytes as the same message.
    edp_bytes_in_xds = route_pb2.RouteConfiguration.FromString(data_e)
    xds_bytes_in_edp = edp_route_v3.RouteConfiguration.parse(data_x)
    equal_xds = edp_bytes_in_xds == msg_x and back_x == msg_x
    equal_edp = xds_bytes_in_edp == msg_e and back_e == msg_e
    wall = time.perf_counter() - wall0

    routes_total = args.vhosts * args.routes
    steps = {"build": (build_x, build_e), "serialise": (ser_x, ser_e), "parse": (parse_x, parse_e)}
    result: dict[str, Any] = {
        "message": "envoy.config.route.v3.RouteConfiguration",
        "vhosts": args.vhosts,
        "routes_per_vhost": args.routes,
        "routes_total": routes_total,
        "repeat": repeat,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": {
            d: version(d) for d in ("xds-protos", "protobuf", "envoy-data-plane", "betterproto2")
        },
        "protobuf_backend": api_implementation.Type(),
        "import_seconds": {"xds-protos": import_xds, "envoy-data-plane": import_edp},
        "encoded_bytes": {"xds-protos": len(data_x), "envoy-data-plane": len(data_e)},
        "bytes_identical": data_x == data_e,
        "decoded_equal": {
            "edp_bytes_parsed_by_xds_protos": edp_bytes_in_xds == msg_x,
            "xds_bytes_parsed_by_edp": xds_bytes_in_edp == msg_e,
        },
        "seconds": {
            step: {
                "xds-protos": {"best": x.best, "median": x.median, "samples": x.samples},
                "envoy-data-plane": {"best": e.best, "median": e.median, "samples": e.samples},
                "ratio_best": e.best / x.best,
                "ratio_median": e.median / x.median,
            }
            for step, (x, e) in steps.items()
        },
        "benchmark_wall_seconds": wall,
    }

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        v = result["versions"]
        print(
            f"RouteConfiguration: {args.vhosts} vhosts x {args.routes} routes = "
            f"{routes_total} routes; best/median of {repeat} runs, GC off while timed"
        )
        print(
            f"xds-protos {v['xds-protos']} (protobuf {v['protobuf']}, "
            f"{result['protobuf_backend']} backend) vs envoy-data-plane "
            f"{v['envoy-data-plane']} (betterproto2 {v['betterproto2']}); "
            f"Python {result['python']} {result['machine']}"
        )
        print()
        header = f"{'step':<10} {'xds-protos ms':>18} {'envoy-data-plane ms':>22} {'ratio':>8}"
        print(header)
        print(f"{'':<10} {'best / median':>18} {'best / median':>22} {'(best)':>8}")
        print("-" * len(header))
        for step, (x, e) in steps.items():
            print(
                f"{step:<10} {ms(x.best) + ' / ' + ms(x.median):>18} "
                f"{ms(e.best) + ' / ' + ms(e.median):>22} {e.best / x.best:>7.1f}x"
            )
        print("-" * len(header))
        print(
            f"{'import':<10} {ms(import_xds):>18} {ms(import_edp):>22} "
            f"{import_edp / import_xds:>7.1f}x  (first import, one sample)"
        )
        print()
        print(
            f"encoded size: xds-protos {len(data_x):,} B, envoy-data-plane {len(data_e):,} B; "
            f"byte-identical: {'yes' if data_x == data_e else 'no'}"
        )
        print(
            "decoded equal: envoy-data-plane bytes parsed by xds-protos == xds-protos message: "
            f"{'yes' if edp_bytes_in_xds == msg_x else 'NO'}; "
            f"reverse: {'yes' if xds_bytes_in_edp == msg_e else 'NO'}"
        )
        print(f"benchmark wall time (excluding imports): {wall:.1f} s")

    if not (equal_xds and equal_edp):
        print("error: the two encodings do not decode to equal messages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
