from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshgate.pacing import spec
from meshgate.pacing.pricing import amounts, cost_micro_usd, price_for, unpriced_refusal

MINI = spec.Price("gpt-4o-mini*", "0.15", "0.60")
GPT4O = spec.Price("gpt-4o*", "2.50", "10")
ANY = spec.Price("*", "100", "100")


def test_first_matching_glob_wins() -> None:
    prices = (MINI, GPT4O, ANY)
    assert price_for(prices, "gpt-4o-mini-2024-07-18") == MINI
    assert price_for(prices, "gpt-4o") == GPT4O
    assert price_for(prices, "o3") == ANY
    assert price_for((GPT4O, MINI), "gpt-4o-mini") == GPT4O
    assert price_for((MINI,), "GPT-4O-MINI") is None  # globs are case-sensitive
    assert price_for((), "gpt-4o") is None


@pytest.mark.parametrize(
    "bad",
    ["", "free", "-1", "NaN", "Infinity", "1/2", "0x10", "1e7", "1e-31", "1e-999999", "1e999999"],
)
def test_a_bad_matching_price_does_not_fall_through_to_a_cheaper_one(bad: str) -> None:
    cheap = spec.Price("*", "0", "0")
    assert price_for((spec.Price("gpt-*", bad, "1"), cheap), "gpt-4o") is None
    assert price_for((spec.Price("gpt-*", "1", bad), cheap), "gpt-4o") is None
    assert price_for((spec.Price("claude-*", bad, "1"), cheap), "gpt-4o") == cheap
    with pytest.raises(ValueError, match="bad price"):
        cost_micro_usd(spec.Price("gpt-*", bad, "1"), 1, 1)


def test_cost_is_micro_usd_rounded_up() -> None:
    assert cost_micro_usd(MINI, 1_000_000, 0) == 150_000  # $0.15 per million input tokens
    assert cost_micro_usd(MINI, 0, 1_000_000) == 600_000
    assert cost_micro_usd(MINI, 1, 0) == 1  # 0.15 micro-USD rounds up, never down to free
    assert cost_micro_usd(MINI, 0, 0) == 0
    assert cost_micro_usd(MINI, 81, 1024) == 627  # 12.15 + 614.4 = 626.55
    assert cost_micro_usd(spec.Price("*", "0.1", "0.2"), 10, 10) == 3  # exact: no 3.0000000004
    # 29 significant digits: a 28-digit Decimal context would round the product down to 1
    assert cost_micro_usd(spec.Price("*", "0.0000000000000000010000000001", "0"), 10**18, 0) == 2
    assert cost_micro_usd(spec.Price("*", "1e-18", "1E+6"), 1, 1) == 1_000_001


def test_amounts_in_every_unit() -> None:
    assert amounts(100, 20, MINI) == {
        "requests": 1,
        "input_tokens": 100,
        "output_tokens": 20,
        "tokens": 120,
        "cost_micro_usd": 27,  # 15 + 12
    }
    assert "cost_micro_usd" not in amounts(100, 20, None)
    assert set(amounts(1, 1, MINI)) == set(spec.UNITS)


def test_unpriced_model_under_a_cost_budget_is_refused() -> None:
    cost = spec.BudgetSpec("agent/a/daily", "cost_micro_usd", 25_000_000, "day")
    tokens = spec.BudgetSpec("agent/a/tokens", "tokens", 10_000, "day")
    message = unpriced_refusal("gpt-4.1", [tokens, cost])
    assert message is not None and "'gpt-4.1'" in message and "cost budget" in message
    assert unpriced_refusal("gpt-4.1", [tokens]) is None
    assert unpriced_refusal("gpt-4.1", []) is None


PRICE_TEXT = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False).map(str)
TOKENS = st.integers(min_value=0, max_value=10**7)


@given(p_in=PRICE_TEXT, p_out=PRICE_TEXT, t_in=TOKENS, t_out=TOKENS, more=TOKENS)
def test_cost_is_the_exact_ceiling_and_grows_with_usage(
    p_in: str, p_out: str, t_in: int, t_out: int, more: int
) -> None:
    price = spec.Price("*", p_in, p_out)
    exact = Fraction(p_in) * t_in + Fraction(p_out) * t_out
    cost = cost_micro_usd(price, t_in, t_out)
    assert cost - 1 < exact <= cost
    assert cost_micro_usd(price, t_in + more, t_out) >= cost
    assert cost_micro_usd(price, t_in, t_out + more) >= cost
