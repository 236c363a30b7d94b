# ruff: noqa: E501  (exact user-facing messages are long; wrapping them would hide typos)
"""Tool entries with argument rules: syntax, compiled model, errors with file:line:col."""

from __future__ import annotations

import re
import time

import pytest
from policy_texts import agent, base, problems
from pydantic_core import PydanticCustomError

from meshgate.policy.loader import load_policy_texts
from meshgate.policy.model import ArgumentRule, EgressRule, ToolRule
from meshgate.policy.serialize import model_from_json, model_to_json
from meshgate.policy.syntax import PATTERN_INPUT_LIMIT, compile_argument_pattern
from meshgate.xds.gateway import egress_routes

R = "    - destination: search-api\n"

MIXED = (
    R
    + """\
      tools:
        - list_issues
        - name: create_issue
          arguments:
            repo: {pattern: "^acme/[a-z0-9._-]+$"}
            title: {maxLength: 200}
            labels: {}
            kind: {enum: [bug, 2, 2.5, true, null, [1], {a: 1}]}
            draft: {const: null}
            n: {minimum: 1, maximum: 9.5}
            ref: {prefix: "refs/heads/"}
          required: [repo, title]
        - name: comment
          additionalArguments: true
"""
)


def rules(text: str) -> tuple[EgressRule, ...]:
    model = load_policy_texts(base(agents=agent("coder", text)))
    coder = model.agent("coder")
    assert coder is not None
    return coder.rules


def test_mixed_entries_compile_to_names_and_tool_rules() -> None:
    (rule,) = rules(MIXED)
    assert rule.tools == ("list_issues", "create_issue", "comment")
    assert rule.tool_rules == (
        ToolRule(
            name="create_issue",
            arguments=(
                ArgumentRule("repo", pattern="^acme/[a-z0-9._-]+$"),
                ArgumentRule("title", max_length=200),
                ArgumentRule("labels"),
                ArgumentRule("kind", enum=('"bug"', "2", "2.5", "true", "null", "[1]", '{"a":1}')),
                ArgumentRule("draft", const="null"),
                ArgumentRule("n", minimum=1, maximum=9.5),
                ArgumentRule("ref", prefix="refs/heads/"),
            ),
            required=("repo", "title"),
            additional_arguments=False,
        ),
        ToolRule(name="comment", additional_arguments=True),
    )
    hash(rule)  # frozen and hashable, like the rest of the model


def test_defaults_require_every_listed_argument_and_refuse_others() -> None:
    text = R + "      tools:\n        - {name: t, arguments: {a: {}, b: {maxLength: 3}}}\n"
    (rule,) = rules(text)
    assert rule.tool_rules == (
        ToolRule("t", (ArgumentRule("a"), ArgumentRule("b", max_length=3)), ("a", "b"), False),
    )
    (rule,) = rules(text.replace("}}}", "}}, required: []}"))
    assert rule.tool_rules[0].required == ()


def test_plain_names_compile_exactly_as_before() -> None:
    (rule,) = rules(R + "      tools: [web_search, fetch]\n")
    assert rule == EgressRule(destination="search-api", tools=("web_search", "fetch"))


def test_model_json_round_trip_keeps_tool_rules() -> None:
    model = load_policy_texts(base(agents=agent("coder", MIXED)))
    assert model_from_json(model_to_json(model)) == model


def test_argument_rules_make_rules_differ_for_duplicate_detection() -> None:
    one = R + "      tools:\n        - {name: t, arguments: {a: {maxLength: 3}}}\n"
    other = R + "      tools:\n        - {name: t, arguments: {a: {maxLength: 4}}}\n"
    assert len(rules(one + other)) == 2
    assert problems(base(agents=agent("coder", one + one))) == [
        'p/agents.yaml:10:7: duplicate rule for agent "coder": same as the rule at p/agents.yaml:7:7'
    ]


CASES = [
    pytest.param(
        "      tools:\n        - t\n        - {name: t, arguments: {a: {}}}\n",
        ['p/agents.yaml:10:11: tools[1] "t" is listed twice'],
        id="duplicate-entry",
    ),
    pytest.param(
        '      tools:\n        - {name: t, arguments: {a: {pattern: "^(a+)+$"}}}\n',
        [
            'p/agents.yaml:9:46: tools[0].arguments.a.pattern "^(a+)+$": a quantifier that repeats (*, +, {m,n}) may only follow a single character or class, like [a-z]+ (nested or grouped repeats can take exponential time)'
        ],
        id="nested-quantifier",
    ),
    pytest.param(
        '      tools:\n        - {name: t, arguments: {a: {pattern: "[a-"}}}\n',
        [
            'p/agents.yaml:9:46: tools[0].arguments.a.pattern "[a-": is not a valid regular expression: unterminated character set at position 0'
        ],
        id="bad-regex",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {patern: x}}}\n",
        ['p/agents.yaml:9:37: unknown field "patern" in argument rule (did you mean "pattern"?)'],
        id="unknown-keyword",
    ),
    pytest.param(
        "      tools:\n        - {name: t, argument: {}}\n",
        ['p/agents.yaml:9:21: unknown field "argument" in tool entry (did you mean "arguments"?)'],
        id="unknown-entry-field",
    ),
    pytest.param(
        '      tools:\n        - {name: t, arguments: {a: {maxLength: "200"}}}\n',
        ["p/agents.yaml:9:48: tools[0].arguments.a.maxLength: expected an integer, got a string"],
        id="maxlength-type",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {minimum: yes}}}\n",
        ['p/agents.yaml:9:46: tools[0].arguments.a.minimum "yes": must be a number'],
        id="minimum-type",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {pattern: 5}}}\n",
        ["p/agents.yaml:9:46: tools[0].arguments.a.pattern: expected a string, got a number"],
        id="pattern-type",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {enum: []}}}\n",
        [
            "p/agents.yaml:9:43: tools[0].arguments.a.enum: must not be empty (omit it to allow any value)"
        ],
        id="empty-enum",
    ),
    pytest.param(
        "      tools:\n        - {name: t, additionalArguments: no}\n",
        ["p/agents.yaml:9:42: tools[0].additionalArguments: expected true or false, got a string"],
        id="yaml-1.2-no-is-a-string",
    ),
    pytest.param(
        "      tools:\n        - {name: t, additionalArguments: 1}\n",
        ["p/agents.yaml:9:42: tools[0].additionalArguments: expected true or false, got a number"],
        id="additional-type",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {pattern: x, minimum: 1}}}\n",
        [
            "p/agents.yaml:9:49: tools[0].arguments.a: pattern applies to strings and minimum to numbers, so no value can pass both"
        ],
        id="string-and-number",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {enum: [x], maxLength: 1}}}\n",
        [
            "p/agents.yaml:9:48: tools[0].arguments.a: maxLength cannot be combined with enum, which already fixes the allowed values"
        ],
        id="enum-and-more",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {minimum: 3, maximum: 1}}}\n",
        ["p/agents.yaml:9:58: tools[0].arguments.a: maximum 1 is below minimum 3"],
        id="min-above-max",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {enum: [x, x]}}}\n",
        ["p/agents.yaml:9:47: tools[0].arguments.a.enum[1] is listed twice"],
        id="enum-duplicate",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {const: 2024-01-01}}}\n",
        [
            "p/agents.yaml:9:44: tools[0].arguments.a.const: not a JSON value (date is not a JSON value)"
        ],
        id="const-not-json",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {const: 18446744073709551617}}}\n",
        [
            "p/agents.yaml:9:44: tools[0].arguments.a.const: not a JSON value (integer 18446744073709551617 is not exact as an IEEE double)"
        ],
        id="const-inexact",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {repo: {}, Repo: {}}}\n",
        [
            'p/agents.yaml:9:43: tools[0].arguments: "repo" and "Repo" differ only in case (some servers read them as one argument)'
        ],
        id="case-clash",
    ),
    pytest.param(
        "      tools:\n        - {name: t, arguments: {a: {}}, required: [b, a, a]}\n",
        [
            'p/agents.yaml:9:52: tools[0].required[0]: "b" is not under arguments (add `b: {}` there to allow any value)',
            'p/agents.yaml:9:58: tools[0].required[2] "a" is listed twice',
        ],
        id="required",
    ),
    pytest.param(
        "      tools:\n        - {arguments: {}}\n",
        ['p/agents.yaml:9:11: missing required field "name" in tool entry'],
        id="missing-name",
    ),
    pytest.param(
        "      tools:\n        - 5\n",
        ["p/agents.yaml:9:11: tools[0]: expected a string, got a number"],
        id="entry-type",
    ),
]


@pytest.mark.parametrize(("rule", "expected"), CASES)
def test_errors(rule: str, expected: list[str]) -> None:
    assert problems(base(agents=agent("coder", R + rule))) == expected


def test_tools_on_passthrough_still_refused_with_argument_rules() -> None:
    text = "    - destination: raw\n      tools: [{name: t}]\n"
    assert problems(base(agents=agent("coder", text))) == [
        'p/agents.yaml:8:7: tools cannot apply: destination "raw" uses tls: passthrough, so the gateway sees only the host'
    ]


@pytest.mark.parametrize(
    "pattern",
    [
        "^acme/[a-z0-9._-]+$",
        "^[a-z0-9-]+/[a-z0-9._-]+$",
        "^(main|develop|release/v[0-9]{1,3})$",
        r"^v1(\.[0-9]+)?$",
        r"^\d{4}-\d{2}-\d{2}$",
        "^(?:ab){3}$",
        r"\bword\b",
    ],
)
def test_patterns_in_the_dialect(pattern: str) -> None:
    compile_argument_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("(a+)+", "single character or class"),
        ("(a|b)*", "single character or class"),
        ("(?:ab)+", "single character or class"),
        ("(a*){3}", "fixed repeat"),
        ("a*a*a*", "at most 2"),
        ("a?b?c?d?", "optional"),
        (r"(a)\1", "outside the supported subset"),
        ("(?=a)a", "outside the supported subset"),
        ("(?<!a)b", "outside the supported subset"),
        ("(?>a)", "outside the supported subset"),
        ("a++", "outside the supported subset"),
        ("(?i)a", "flags"),
        ("(?i:a)", "flags"),
        ("a" * 513, "at most 512"),
    ],
)
def test_patterns_outside_the_dialect(pattern: str, words: str) -> None:
    with pytest.raises(PydanticCustomError) as e:
        compile_argument_pattern(pattern)
    assert words in str(e.value)


def test_patterns_match_whole_values_with_ascii_classes() -> None:
    p = compile_argument_pattern("^acme/[a-z0-9._-]+$")
    assert p.fullmatch("acme/web")
    assert not p.fullmatch("acme/web\n")  # `$` before a final newline: not with fullmatch
    assert not p.fullmatch("evil/acme/web")
    assert compile_argument_pattern("acme/.*").fullmatch("acme/x")
    assert not compile_argument_pattern("acme/").fullmatch("acme/x")  # anchors are implied
    assert not compile_argument_pattern(r"\d+").fullmatch("\u0661\u0662")  # Arabic-Indic digits
    assert compile_argument_pattern(r"\d+").flags & re.ASCII


def test_worst_allowed_pattern_on_the_longest_value_is_fast() -> None:
    """No timeout exists for `re`: the dialect must keep the worst case small by itself."""
    worst = [
        ("[a-z]*a[a-z]*b", "a" * PATTERN_INPUT_LIMIT),
        (".*a.*b", "a" * PATTERN_INPUT_LIMIT),
        ("a?a?(?:.*a)?.*b", "a" * PATTERN_INPUT_LIMIT),
    ]
    for pattern, value in worst:
        regex = compile_argument_pattern(pattern)
        start = time.process_time()
        assert not regex.fullmatch(value)
        spent = time.process_time() - start
        assert spent < 0.1, f"{pattern}: {spent * 1000:.1f} ms"


def test_gateway_routes_match_every_entry_name() -> None:
    """Envoy's routes match tool names: an entry with argument rules is a name there too, so a
    rule with only such entries never becomes "any tool" (the pacer then checks arguments)."""
    text = (
        R
        + "      tools:\n        - list_issues\n        - {name: create_issue, arguments: {repo: {prefix: acme/}}}\n"
    )
    only_objects = R + "      tools: [{name: comment}]\n      methods: [POST]\n"
    model = load_policy_texts(base(agents=agent("coder", text + only_objects)))
    table = egress_routes(model, {})
    routes = next(v for v in table.virtual_hosts if v.name == "search-api").routes
    regexes = [
        m.value.string_match.safe_regex.regex
        for r in routes
        for m in r.match.dynamic_metadata
        if m.value.string_match.WhichOneof("match_pattern") == "safe_regex"
    ]
    assert regexes == ["^(list_issues|create_issue)$", "^(comment)$"]
    assert any(r.name.startswith("deny-tool/") for r in routes)
