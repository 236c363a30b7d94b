"""Filters chosen by :authority match what Envoy's virtual hosts match: any case, wildcards as
suffixes, an exact domain before a wildcard and a longer wildcard before a shorter one."""

from __future__ import annotations

from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshgate.xds.common import authority_matcher, authority_value


def test_a_wildcard_is_a_case_insensitive_suffix_and_a_name_is_exact() -> None:
    wild = authority_value("*.wild.internal:80")
    assert wild.suffix == ".wild.internal:80" and wild.ignore_case
    exact = authority_value("api.wild.internal")
    assert exact.exact == "api.wild.internal" and exact.ignore_case


def _action(name: str) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name=name))


def test_on_a_miss_exact_names_come_first_then_longer_wildcards() -> None:
    table = {
        "*.internal": _action("short"),
        "*.wild.internal": _action("long"),
        "api.wild.internal": _action("exact"),
    }
    tree = authority_matcher(table)
    assert set(tree.matcher_tree.exact_match_map.map) == set(table)
    listed = tree.on_no_match.matcher.matcher_list.matchers
    order = [m.on_match.action.name for m in listed]
    assert order == ["exact", "long", "short"]
    assert listed[1].predicate.single_predicate.value_match.suffix == ".wild.internal"
