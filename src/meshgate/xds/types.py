"""Resource type URLs and the order in which a new snapshot is pushed.

The order of TYPE_ORDER MATTERS: Envoy warms clusters (and their endpoints) before listeners
that route to them, so CDS/EDS go out before LDS/RDS; secrets last because listeners and clusters
already name them and Envoy waits for them while warming.
"""

from __future__ import annotations

from typing import Final

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

TYPE_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

SHORT_NAMES: Final[dict[str, str]] = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    SECRET: "sds",
}

# With a wildcard subscription Envoy expects every resource of these types in each response;
# the others are always requested by name.
WILDCARD_TYPES: Final[frozenset[str]] = frozenset({CLUSTER, LISTENER})


def order_key(type_url: str) -> int:
    """Position of a type in push order; unknown types sort last."""
    try:
        return TYPE_ORDER.index(type_url)
    except ValueError:
        return len(TYPE_ORDER)
