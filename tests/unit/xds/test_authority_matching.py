"""Filters chosen by :authority: the MCP parser's matches what Envoy's virtual hosts match (any
case, a wildcard as a suffix); the secret-adding injectors' match exact names first, so a
wildcard's credential never reaches a destination named exactly under it."""

from __future__ import annotations

import re

from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshgate.policy.model import Destination
from meshgate.xds.common import authority_matcher, authority_value, one_label_regex


def test_a_wildcard_is_a_case_insensitive_suffix_and_a_name_is_exact() -> None:
    wild = authority_value("*.wild.internal:80")
    assert wild.suffix == ".wild.internal:80" and wild.ignore_case
    exact = authority_value("api.wild.internal")
    assert exact.exact == "api.wild.internal" and exact.ignore_case


def test_an_injector_takes_exact_names_first_then_one_label_under_a_wildcard() -> None:
    wild = Destination("wild", "*.wild.internal", 80)
    api = Destination("api", "api.wild.internal", 80)
    action = matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="x"))
    tree = authority_matcher({wild: action}, [wild, api])
    # the exact name of another destination: skipped, in any case
    table = tree.matcher_tree.exact_match_map.map
    assert set(table) == {"api.wild.internal", "api.wild.internal:80"}
    assert all(m.action.name == "skip" for m in table.values())
    # then the same names in any case, and only after them the wildcard: one label under it,
    # with its port or none (a list's first match wins)
    *names, wildcard = tree.on_no_match.matcher.matcher_list.matchers
    assert {m.predicate.single_predicate.value_match.exact for m in names} == set(table)
    assert all(m.predicate.single_predicate.value_match.ignore_case for m in names)
    assert wildcard.on_match.action.name == "x"
    regex = re.compile(wildcard.predicate.single_predicate.value_match.safe_regex.regex)
    assert regex.fullmatch("a.wild.internal") and regex.fullmatch("A.Wild.Internal:80")
    assert not regex.fullmatch("a.b.wild.internal") and not regex.fullmatch("a.wild.internal:81")
    assert one_label_regex("*.wild.internal", 80) == regex.pattern
