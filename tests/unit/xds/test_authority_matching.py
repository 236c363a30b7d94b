"""Filters chosen by :authority pick a destination as Envoy's virtual hosts do (any case), a
wildcard standing for one label, and never a name under it that another destination names
exactly: the MCP parser acts only on its destinations' traffic, a wildcard's credential never
reaches another destination's upstream."""

from __future__ import annotations

import re

from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshgate.policy.model import Destination
from meshgate.xds.common import authority_matcher, destination_predicate, one_label_regex


def test_a_filter_for_a_wildcard_leaves_names_other_destinations_hold() -> None:
    wild = Destination("wild", "*.wild.internal", 80)
    api = Destination("api", "api.wild.internal", 80)
    elsewhere = Destination("docs", "docs.internal", 80)
    run = destination_predicate(wild, [wild, api, elsewhere]).and_matcher.predicate
    one_label, not_taken = run
    regex = re.compile(one_label.single_predicate.value_match.safe_regex.regex)
    assert regex.fullmatch("a.wild.internal") and not regex.fullmatch("a.b.wild.internal")
    taken = not_taken.not_matcher.or_matcher.predicate
    # only the names under the wildcard (others cannot match its regex anyway), in any case
    assert [p.single_predicate.value_match.exact for p in taken] == [
        "api.wild.internal",
        "api.wild.internal:80",
    ]
    assert all(p.single_predicate.value_match.ignore_case for p in taken)
    # an exact destination: its names, in any case
    names = destination_predicate(api, [wild, api]).or_matcher.predicate
    assert [
        (p.single_predicate.value_match.exact, p.single_predicate.value_match.ignore_case)
        for p in names
    ] == [("api.wild.internal", True), ("api.wild.internal:80", True)]


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
