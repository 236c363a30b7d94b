"""Prometheus metrics of one pacer (one gateway replica), in their own registry.

Served on the gateway's own metrics listener (`--metrics-port`, loopback, or
`--metrics-address` for Prometheus, behind a NetworkPolicy): labels name agents and budgets,
which the control plane's public `/metrics` must not.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshgate.pacer.fair_queue import Limiter

# decision labels: kind is global_limit | admission; decision is what the pacer answered
GLOBAL_LIMIT = "global_limit"
ADMISSION = "admission"


class PacerMetrics:
    def __init__(self, limiter: Limiter) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self._decisions = prometheus_client.Counter(
            "meshgate_pacer_decisions",
            "Pacer decisions by kind (global_limit, admission) and outcome",
            ["kind", "decision"],
            registry=self.registry,
        )
        self._limit_store_calls = prometheus_client.Counter(
            "meshgate_pacer_limit_store_calls",
            "Calls to the limit store for global limits (each leases one or more tokens)",
            registry=self.registry,
        )
        self._spent = prometheus_client.Gauge(
            "meshgate_budget_spent",
            "Spent in the current window, as last seen by this pacer",
            ["budget"],
            registry=self.registry,
        )
        prometheus_client.Gauge(
            "meshgate_gateway_capacity_waiting",
            "Requests waiting for gateway capacity (the autoscaling signal)",
            registry=self.registry,
        ).set_function(limiter.capacity_waiting)
        self.registry.register(_Waiting(limiter))

    def decision(self, kind: str, decision: str) -> None:
        self._decisions.labels(kind, decision).inc()

    def limit_store_call(self) -> None:
        self._limit_store_calls.inc()

    def spent(self, budget: str, value: int) -> None:
        self._spent.labels(budget).set(value)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _Waiting(Collector):
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meshgate_queue_waiting", "Requests waiting for an in-flight slot", labels=["key"]
        )
        for key, n in sorted(self._limiter.waiting_by_key().items()):
            family.add_metric([key], n)
        yield family
