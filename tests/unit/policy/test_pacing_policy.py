# ruff: noqa: E501  (exact user-facing messages are long)
"""Policy for issue 19: global limits, budgets, concurrency caps and model rules, as a user
writes them, compiled to the model or refused with `file:line:col` messages."""

from __future__ import annotations

from policy_texts import HEAD, agent, base, problems

from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import Budget, Concurrency, Llm, Price, RateLimit

LLM = (
    "---\n" + HEAD + "kind: Destination\nmetadata: {name: openai}\nspec:\n"
    "  host: api.openai.com\n  port: 443\n"
    '  llm: {api: openai, prices: {"gpt-4o-mini": {input: "0.15", output: 0.6}}}\n'
    "  concurrency: {max: 64, maxWait: 30s}\n"
)
GROUP = (
    HEAD + "kind: AgentGroup\nmetadata: {name: team}\nspec:\n  agents: [coder]\n"
    "  budgets: [{name: monthly, window: month, cost: 100}]\n"
)


def files(rules: str, budgets: str = "", **extra: str) -> dict[str, str]:
    text = agent("coder", rules)
    if budgets:
        text = text.replace("  egress:\n", f"  budgets: {budgets}\n  egress:\n")
    out = base(coder=text, **extra)
    out["p/dest.yaml"] += LLM
    return out


def test_everything_compiles_into_the_model() -> None:
    rules = (
        "    - destination: openai\n"
        "      rateLimit: {requests: 600, per: 1m, scope: global, onStoreFailure: closed}\n"
        "      concurrency: {max: 4, maxWait: 1.5s}\n"
        '      models: ["gpt-4o-mini", "gpt-4o*"]\n'
        "      maxTokens: 1024\n"
        "      budgets: [{name: hourly, window: hour, tokens: 10000}]\n"
    )
    model = load_policy_texts(
        files(rules, budgets='[{name: daily, window: day, cost: "25.005"}]', group=GROUP)
    )
    openai = model.destination("openai")
    assert openai.llm == Llm("openai", (Price("gpt-4o-mini", "0.15", "0.6"),))
    assert openai.concurrency == Concurrency(64, 30_000)
    coder = model.agent("coder")
    assert coder is not None
    rule = coder.rules[0]
    assert rule.rate_limit == RateLimit(600, 60, "global", "closed")
    assert rule.concurrency == Concurrency(4, 1500)
    assert rule.models == ("gpt-4o-mini", "gpt-4o*") and rule.max_tokens == 1024
    assert rule.budgets == (Budget("hourly", "tokens", 10_000, "hour"),)
    # money in whole micro-dollars, rounded up: a budget is never larger than written
    assert coder.budgets == (Budget("daily", "cost_micro_usd", 25_005_000, "day"),)
    assert [(g.group, g.budget.limit) for g in coder.group_budgets] == [("team", 100_000_000)]


def test_defaults_keep_todays_local_limits() -> None:
    rules = "    - destination: search-api\n      rateLimit: {requests: 3, per: 1m}\n"
    coder = load_policy_texts(files(rules)).agent("coder")
    assert coder is not None and coder.rules[0].rate_limit == RateLimit(3, 60, "replica", "open")


def test_errors_say_what_and_where() -> None:
    rules = (
        "    - destination: search-api\n"
        "      models: [gpt-4o]\n"
        "      budgets: [{name: t, window: day, tokens: 5}]\n"
        "    - destination: openai\n"
        "      budgets: [{name: x, window: hour, requests: 5, tokens: 3}, {name: y, window: week, requests: 1}]\n"
        "      concurrency: {max: 0, maxWait: 20m}\n"
        "    - destination: raw\n"
        "      concurrency: {max: 2}\n"
    )
    assert problems(files(rules)) == [
        'p/coder.yaml:11:84: budgets[1].window "week": must be one of hour, day, month',
        "p/coder.yaml:12:26: concurrency.max 0: must be between 1 and 1000000",
        'p/coder.yaml:12:38: concurrency.maxWait "20m": must be at most 10m',
    ]
    rules = rules.replace(", {name: y, window: week, requests: 1}", "").replace(
        "max: 0, maxWait: 20m", "max: 2"
    )
    assert problems(files(rules, budgets="[{name: d, window: day}]")) == [
        'p/coder.yaml:6:14: budget "d" needs exactly one of requests, tokens, inputTokens, outputTokens, cost (found none)',
        'p/coder.yaml:9:7: models needs an LLM destination: "search-api" has no llm block (llm: {api: openai} or {api: anthropic})',
        'p/coder.yaml:10:17: budget "t" counts tokens or cost, which needs an LLM destination: "search-api" has no llm block (llm: {api: openai} or {api: anthropic})',
        'p/coder.yaml:12:18: budget "x" needs exactly one of requests, tokens, inputTokens, outputTokens, cost (found requests and tokens)',
        'p/coder.yaml:15:7: concurrency cannot apply: destination "raw" uses tls: passthrough, so the gateway sees only the host',
    ]


def test_a_cost_budget_needs_prices_and_money_is_checked() -> None:
    no_prices = files(
        "    - destination: openai\n      budgets: [{name: c, window: day, cost: 1}]\n"
    )
    no_prices["p/dest.yaml"] = no_prices["p/dest.yaml"].replace(
        ', prices: {"gpt-4o-mini": {input: "0.15", output: 0.6}}', ""
    )
    assert problems(no_prices) == [
        'p/coder.yaml:8:17: budget "c" counts cost, but destination "openai" has no llm.prices'
    ]
    bad_money = files(
        "    - destination: openai\n      budgets: [{name: c, window: day, cost: -1}]\n"
    )
    assert problems(bad_money) == [
        "p/coder.yaml:8:46: budgets[0].cost -1: must be between 0 and 1000000000"
    ]
    twice = files(
        "    - destination: openai\n",
        budgets="[{name: a, window: day, requests: 1}, {name: a, window: hour, requests: 2}]",
    )
    assert problems(twice) == [
        'p/coder.yaml:6:57: budget "a" is defined twice (first at p/coder.yaml:6:20)'
    ]
