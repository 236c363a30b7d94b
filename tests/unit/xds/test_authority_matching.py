"""Filters chosen by :authority: the MCP parser's matches what Envoy's virtual hosts match (any
case, a wildcard as a suffix); the secret-adding injectors' match exact names only, so a
wildcard's credential never reaches a destination named exactly under it."""

from __future__ import annotations

from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshgate.xds.common import authority_matcher, authority_value


def test_a_wildcard_is_a_case_insensitive_suffix_and_a_name_is_exact() -> None:
    wild = authority_value("*.wild.internal:80")
    assert wild.suffix == ".wild.internal:80" and wild.ignore_case
    exact = authority_value("api.wild.internal")
    assert exact.exact == "api.wild.internal" and exact.ignore_case


def test_injectors_match_exact_names_only() -> None:
    action = matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="x"))
    tree = authority_matcher({"*.wild.internal": action})
    listed = tree.on_no_match.matcher.matcher_list.matchers
    assert [m.predicate.single_predicate.value_match.exact for m in listed] == ["*.wild.internal"]
    assert not listed[0].predicate.single_predicate.value_match.suffix
