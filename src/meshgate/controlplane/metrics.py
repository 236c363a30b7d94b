"""Prometheus metrics of the control plane, in one registry served at `/metrics`.

Only label-free counters and gauges: the endpoint is public (docs/admin-auth.md), so nothing
here may name an agent, a destination or policy content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import prometheus_client
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from meshgate.xds import types


class Metrics:
    """What the services report; each calls the one method that concerns it."""

    def __init__(self, streams: Callable[[], int], nacks: Callable[[], int]) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self._applied = prometheus_client.Counter(
            "meshgate_policy_applied", "Policy versions applied", registry=self.registry
        )
        self._rejected = prometheus_client.Counter(
            "meshgate_policy_rejected", "Policy changes refused", registry=self.registry
        )
        self._audit = prometheus_client.Counter(
            "meshgate_audit_records",
            "Audit records received over the access-log service",
            registry=self.registry,
        )
        self._audit_new = prometheus_client.Counter(
            "meshgate_audit_records_stored",
            "Audit records stored (received minus resent duplicates)",
            registry=self.registry,
        )
        self._shadow = prometheus_client.Counter(
            "meshgate_shadow_decisions",
            "Would-be decisions of shadow rules, and how each differs from what was enforced "
            "(same, newly_refused, newly_allowed, undecided)",
            ["decision", "change"],
            registry=self.registry,
        )
        prometheus_client.Gauge(
            "meshgate_xds_streams", "Connected xDS streams", registry=self.registry
        ).set_function(streams)
        prometheus_client.Gauge(
            "meshgate_xds_nacks", "NACKs in recent history", registry=self.registry
        ).set_function(nacks)

    def xds_pushes(
        self, pending: Callable[[], int], in_flight: Callable[[], int], sent: Mapping[str, int]
    ) -> None:
        """The push queue's depth and the responses sent per type (the ADS service's counts)."""
        prometheus_client.Gauge(
            "meshgate_xds_push_pending", "Streams waiting for a push slot", registry=self.registry
        ).set_function(pending)
        prometheus_client.Gauge(
            "meshgate_xds_push_in_flight", "Streams being pushed now", registry=self.registry
        ).set_function(in_flight)
        self.registry.register(_SentByType(sent))

    def policy_applied(self) -> None:
        self._applied.inc()

    def policy_rejected(self) -> None:
        self._rejected.inc()

    def audit_committed(self, received: int, new: int) -> None:
        """Thread-safe: the audit ingest thread calls it after each commit."""
        self._audit.inc(received)
        self._audit_new.inc(new)

    def shadow_decision(self, decision: str, change: str) -> None:
        """Thread-safe: the audit ingest thread calls it per shadowed record."""
        self._shadow.labels(decision, change).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _SentByType(Collector):
    """`meshgate_xds_responses_total{type}`, read from the ADS service's own counter."""

    def __init__(self, sent: Mapping[str, int]) -> None:
        self._sent = sent

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "meshgate_xds_responses", "xDS responses sent, by resource type", labels=["type"]
        )
        for type_url, count in sorted(self._sent.items()):
            family.add_metric([types.SHORT_NAMES.get(type_url, type_url)], count)
        yield family
