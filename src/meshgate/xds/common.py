"""Small builders shared by the gateway and sidecar translators."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message


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


def json_refusal(status: int, fields: dict[str, str]) -> route_components_pb2.DirectResponseAction:
    """A refusal with a small JSON body; values may use Envoy's %COMMAND% substitutions."""
    body = struct_pb2.Struct()
    body.update(fields)
    return route_components_pb2.DirectResponseAction(
        status=status,
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body, content_type="application/json"
        ),
    )


def connect_upgrade() -> hcm_pb2.HttpConnectionManager.UpgradeConfig:
    """Accept HTTP CONNECT on this connection manager (routes decide what happens to it)."""
    return hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="CONNECT")
