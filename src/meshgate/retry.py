"""The one retry policy for talking to outside systems (Consul, Vault, the control plane).

Exponential backoff with jitter and a cap, built from tenacity's wait strategies: attempt n
waits about `base * 2**(n-1)`, never more than `cap`. Equal jitter (the default) waits between
half and all of that, so the first retry comes quickly yet many clients that failed together
(gateways after a control-plane restart, watches after a Consul election) do not retry in
lockstep; full jitter waits anywhere from 0. Async callers sleep with asyncio (tenacity's
`AsyncRetrying`), never blocking the event loop; callers that schedule instead of sleeping
(the Vault CA renews on the next issuance after its due time) ask for `delay(n)`.

`Outage` keeps logs to one warning when failures start and one line when they end, not one
per retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

T = TypeVar("T")
Jitter = Literal["equal", "full"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff from `base` seconds, capped at `cap`, jittered."""

    base: float
    cap: float
    jitter: Jitter = "equal"

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap (got {self.base}, {self.cap})")

    def wait(self) -> wait_base:
        """The tenacity wait strategy: attempt n -> its delay before attempt n + 1."""
        if self.jitter == "full":
            return wait_random_exponential(multiplier=self.base, max=self.cap)
        half_base, half_cap = self.base / 2, self.cap / 2
        # equal jitter: half the exponential delay fixed, the other half random
        fixed = wait_exponential(multiplier=half_base, max=half_cap)
        return fixed + wait_random_exponential(multiplier=half_base, max=half_cap)

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (1 for the first)."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(failures, 1)
        return float(self.wait()(state))

    async def until_success(
        self,
        call: Callable[[], Awaitable[T]],
        on_failure: Callable[[BaseException, float], Awaitable[None] | None],
        retry_on: tuple[type[BaseException], ...] = (Exception,),
    ) -> T:
        """`await call()` until it returns, sleeping (asyncio) between failures.

        `on_failure(error, next_delay)` (plain or async) runs after each failure that will be
        retried. An error outside `retry_on` (and cancellation, which is no Exception)
        propagates at once."""

        async def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None and state.next_action is not None
            error = state.outcome.exception()
            assert error is not None
            pending = on_failure(error, state.next_action.sleep)
            if pending is not None:
                await pending

        retrying = AsyncRetrying(
            sleep=_sleep,
            stop=stop_never,
            wait=self.wait(),
            retry=retry_if_exception_type(retry_on),
            before_sleep=before_sleep,
            reraise=True,
        )

        async def attempt() -> T:  # tenacity would treat a lambda returning a coroutine as sync
            return await call()

        result: T = await retrying(attempt)
        return result


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class Outage:
    """One log line when an outside system starts failing and one when it is back."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.failing = False

    def failed(self, message: str, *args: object) -> None:
        """A warning for the first failure of an outage; later ones only at debug level."""
        level = logging.DEBUG if self.failing else logging.WARNING
        self.failing = True
        self.log.log(level, message, *args, stacklevel=2)  # the caller's line, not ours

    def recovered(self, message: str, *args: object) -> None:
        if self.failing:
            self.failing = False
            self.log.info(message, *args, stacklevel=2)
