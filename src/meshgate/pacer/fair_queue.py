"""In-flight caps per key with a bounded wait, fair between agents when asked.

One `Limiter` per pacer (per gateway replica): caps are per replica by design. Everything
runs on the pacer's event loop, so the bookkeeping needs no lock. A waiter holds a future;
`release` hands its slot straight to the next waiter (no window where a newcomer could take
it), so `in_flight` never passes `max`. With `fair`, waiters queue per agent and the slot
goes round-robin between agents with waiters, so one agent's flood waits behind itself only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from meshgate.pacing.spec import ConcurrencySpec


@dataclass
class _Queue:
    max: int
    fair: bool
    capacity: bool
    in_flight: int = 0
    waiting: int = 0
    per_agent: dict[str, deque[asyncio.Future[None]]] = field(default_factory=dict)
    turns: deque[str] = field(default_factory=deque)  # agents with waiters, next first


class Slot:
    """One admitted request's hold on one key; `release` is idempotent."""

    def __init__(self, limiter: Limiter, key: str) -> None:
        self._limiter = limiter
        self.key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release(self.key)


MAX_WAITING = 1000  # per key and agent (fair) or per key: a flood is refused, not held


class Limiter:
    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self._queues: dict[str, _Queue] = {}
        self.max_waiting = max_waiting

    async def acquire(self, spec: ConcurrencySpec, agent: str, timeout: float) -> Slot | None:
        """A slot on `spec.key` within `timeout` seconds, or None. Cancelling the caller
        never leaks a slot: one granted as it gave up is passed on."""
        q = self._queues.get(spec.key)
        if q is None:
            q = self._queues[spec.key] = _Queue(spec.max, spec.fair, spec.capacity)
        else:  # the policy may have changed: the newest request's spec wins
            q.max, q.fair, q.capacity = spec.max, spec.fair, spec.capacity
            self._dispatch(q)
        if q.in_flight < q.max and q.waiting == 0:
            q.in_flight += 1
            return Slot(self, spec.key)
        if timeout <= 0:
            self._forget_if_idle(spec.key, q)
            return None
        who = agent if q.fair else ""
        waiters = q.per_agent.get(who)
        if waiters is not None and len(waiters) >= self.max_waiting:
            return None  # memory stays bounded; with `fair`, only the flooding agent is refused
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if waiters is None:
            waiters = q.per_agent[who] = deque()
            q.turns.append(who)
        waiters.append(fut)
        q.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # granted just as the wait ran out
                return Slot(self, spec.key)
            self._give_up(spec.key, q, who, fut)
            return None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as the caller went away
                self._release(spec.key)
            else:
                self._give_up(spec.key, q, who, fut)
            raise
        return Slot(self, spec.key)

    def waiting(self, key: str) -> int:
        q = self._queues.get(key)
        return q.waiting if q else 0

    def waiting_of(self, key: str, agent: str) -> int:
        """How many of `agent`'s requests wait on a fair `key`."""
        q = self._queues.get(key)
        waiters = q.per_agent.get(agent) if q else None
        return len(waiters) if waiters else 0

    def in_flight(self, key: str) -> int:
        q = self._queues.get(key)
        return q.in_flight if q else 0

    def waiting_by_key(self) -> dict[str, int]:
        # copied first: the metrics thread reads this while the loop mutates it
        return {k: q.waiting for k, q in list(self._queues.items()) if q.waiting}

    def capacity_waiting(self) -> int:
        """Requests waiting for gateway capacity (keys with capacity=True): the scaling signal."""
        return sum(q.waiting for q in list(self._queues.values()) if q.capacity)

    def keys(self) -> int:
        return len(self._queues)

    def _release(self, key: str) -> None:
        q = self._queues[key]
        q.in_flight -= 1
        self._dispatch(q)
        self._forget_if_idle(key, q)

    def _dispatch(self, q: _Queue) -> None:
        while q.in_flight < q.max and q.turns:
            who = q.turns.popleft()
            waiters = q.per_agent[who]
            fut = waiters.popleft()
            q.waiting -= 1
            if waiters:
                q.turns.append(who)
            else:
                del q.per_agent[who]
            # a waiter whose task was cancelled has a cancelled future until its own handler
            # runs (`_give_up`): it is gone, so the slot goes to the next one
            if fut.done():
                continue
            q.in_flight += 1
            fut.set_result(None)

    def _give_up(self, key: str, q: _Queue, who: str, fut: asyncio.Future[None]) -> None:
        fut.cancel()
        waiters = q.per_agent.get(who)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            q.waiting -= 1
            if not waiters:
                del q.per_agent[who]
                q.turns.remove(who)
        self._forget_if_idle(key, q)

    def _forget_if_idle(self, key: str, q: _Queue) -> None:
        if q.in_flight == 0 and q.waiting == 0:
            self._queues.pop(key, None)
