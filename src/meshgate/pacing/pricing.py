"""What an LLM call costs, from a destination's price table. Pure: no I/O.

Prices are USD per million tokens, so a price is also micro-USD per token: a cost in the
`cost_micro_usd` unit is `input * price.input + output * price.output`, rounded up (a budget
is never under-charged by rounding). Exact arithmetic on the decimal strings: no float drift
and no rounding inside the products.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from fractions import Fraction

from meshgate.pacing import spec


def price_for(prices: Sequence[spec.Price], model: str) -> spec.Price | None:
    """The first price whose glob matches `model`, if it is a usable price.

    A matching price that is not a finite decimal >= 0 stops the search and gives None: a
    typo in the price table must not fall through to a cheaper catch-all entry."""
    for price in prices:
        if fnmatchcase(model, price.model):
            if _rate(price.input) is None or _rate(price.output) is None:
                return None
            return price
    return None


def cost_micro_usd(price: spec.Price, input_tokens: int, output_tokens: int) -> int:
    """ceil(input * input price + output * output price), in micro-USD, computed exactly."""
    rate_in, rate_out = _rate(price.input), _rate(price.output)
    if rate_in is None or rate_out is None:
        raise ValueError(f"bad price for {price.model!r}: {price.input!r}/{price.output!r}")
    return math.ceil(rate_in * input_tokens + rate_out * output_tokens)


def amounts(
    input_tokens: int, output_tokens: int, price: spec.Price | None
) -> dict[spec.Unit, int]:
    """One call's charge in every unit a budget can count; `cost_micro_usd` only when priced.

    Used twice with the same price: with the most a request can use (the reservation) and
    with what the provider reported (the settlement)."""
    out: dict[spec.Unit, int] = {
        "requests": 1,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens": input_tokens + output_tokens,
    }
    if price is not None:
        out["cost_micro_usd"] = cost_micro_usd(price, input_tokens, output_tokens)
    return out


def needs_price(budgets: Iterable[spec.BudgetSpec]) -> bool:
    return any(b.unit == "cost_micro_usd" for b in budgets)


def unpriced_refusal(model: str, budgets: Iterable[spec.BudgetSpec]) -> str | None:
    """Why a call to `model`, which has no usable price, must be refused; None when no cost
    budget applies. A cost budget cannot hold a call it cannot price, so the pacer fails
    closed: the model is refused (`spec.MODEL_NOT_ALLOWED`) with this message."""
    if not needs_price(budgets):
        return None
    return (
        f"model {model!r} has no price on this destination and a cost budget applies, "
        "so its cost cannot be counted"
    )


MAX_PRICE = 1_000_000  # USD per million tokens; anything above is a typo, not a price
MIN_EXPONENT = -30  # finer than 1e-30 USD per million tokens is a typo too


def _rate(text: str) -> Fraction | None:
    """A price as an exact number; None unless a plain decimal in [0, MAX_PRICE] (bounded so
    that a price like "1e-999999" cannot make every cost computation a huge-integer one)."""
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        return None
    if not value.is_finite() or not 0 <= value <= MAX_PRICE:
        return None
    exponent = value.normalize().as_tuple().exponent
    if not isinstance(exponent, int) or exponent < MIN_EXPONENT:
        return None
    return Fraction(value)
