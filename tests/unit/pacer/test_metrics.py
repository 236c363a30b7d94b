"""The pacer's Prometheus metrics: queue lengths per key and the gateway-capacity signal."""

from __future__ import annotations

import asyncio

from meshgate.pacer.fair_queue import Limiter
from meshgate.pacer.metrics import ADMISSION, PacerMetrics
from meshgate.pacing.spec import ConcurrencySpec


async def test_waiting_per_key_and_capacity_waiting() -> None:
    limiter = Limiter()
    metrics = PacerMetrics(limiter)
    gateway = ConcurrencySpec("gateway", 1, 1000, fair=True, capacity=True)
    agent = ConcurrencySpec("rule/a/openai/0", 1, 1000)
    assert await limiter.acquire(gateway, "a", 0) is not None
    assert await limiter.acquire(agent, "a", 0) is not None
    waiters = [asyncio.create_task(limiter.acquire(gateway, "b", 0.5)) for _ in range(2)]
    waiters.append(asyncio.create_task(limiter.acquire(agent, "a", 0.5)))
    await asyncio.sleep(0.01)
    metrics.decision(ADMISSION, "queue_timeout")
    metrics.spent("agent/a/daily", 42)
    text = metrics.exposition().decode()
    assert "meshgate_gateway_capacity_waiting 2.0" in text  # not the agent's own cap
    assert 'meshgate_queue_waiting{key="gateway"} 2.0' in text
    assert 'meshgate_queue_waiting{key="rule/a/openai/0"} 1.0' in text
    assert 'meshgate_pacer_decisions_total{decision="queue_timeout",kind="admission"} 1.0' in text
    assert 'meshgate_budget_spent{budget="agent/a/daily"} 42.0' in text
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    text = metrics.exposition().decode()
    assert "meshgate_gateway_capacity_waiting 0.0" in text
    assert "meshgate_queue_waiting{" not in text
