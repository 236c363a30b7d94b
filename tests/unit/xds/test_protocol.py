"""The pure xDS request rules: classification, subscriptions, push decisions, delta plans."""

from meshgate.xds import types
from meshgate.xds.protocol import (
    Kind,
    TypeState,
    apply_delta_subscription,
    classify,
    plan_delta,
    should_push,
    sotw_names,
)


def test_classify_first_request_is_new() -> None:
    assert classify(TypeState(types.CLUSTER), "", False) is Kind.NEW


def test_classify_reconnect_without_nonce_is_new_even_with_state() -> None:
    st = TypeState(types.CLUSTER, nonce_sent="1-4")
    assert classify(st, "", False) is Kind.NEW


def test_classify_ack_nack_and_stale() -> None:
    st = TypeState(types.CLUSTER, nonce_sent="1-4")
    assert classify(st, "1-4", False) is Kind.ACK
    assert classify(st, "1-4", True) is Kind.NACK
    assert classify(st, "1-3", False) is Kind.STALE
    assert classify(st, "1-3", True) is Kind.STALE


def test_sotw_names_wildcard_only_for_cds_and_lds() -> None:
    assert sotw_names(types.CLUSTER, []) is None
    assert sotw_names(types.LISTENER, ["*"]) is None
    assert sotw_names(types.ROUTE, []) == frozenset()
    assert sotw_names(types.ENDPOINT, ["a", "b"]) == frozenset({"a", "b"})


def test_should_push_holds_while_in_flight_and_skips_rejected() -> None:
    st = TypeState(types.CLUSTER, nonce_sent="1-1", version_sent="v1")
    assert should_push(st, "v2")
    st.in_flight = True
    assert not should_push(st, "v2")
    st.in_flight = False
    assert not should_push(st, "v1")
    st.rejected_version = "v2"
    assert not should_push(st, "v2")
    assert should_push(st, "v3")


def test_should_push_never_before_first_response() -> None:
    assert not should_push(TypeState(types.CLUSTER), "v1")


def test_delta_wildcard_plan_sends_only_changed_and_removes_gone() -> None:
    st = TypeState(types.CLUSTER)
    apply_delta_subscription(st, [], [], first=True)
    assert st.wildcard
    st.client_versions = {"a": "1", "b": "1", "gone": "1"}
    plan = plan_delta(st, {"a": "1", "b": "2", "c": "1"})
    assert plan.updated == ("b", "c")
    assert plan.removed == ("gone",)


def test_delta_named_subscription_and_unsubscribe() -> None:
    st = TypeState(types.ROUTE)
    apply_delta_subscription(st, ["r1", "r2"], [], first=True)
    assert not st.wildcard
    assert plan_delta(st, {"r1": "1", "r2": "1", "r3": "1"}).updated == ("r1", "r2")
    st.client_versions = {"r1": "1", "r2": "1"}
    apply_delta_subscription(st, [], ["r2"], first=False)
    assert st.client_versions == {"r1": "1"}
    assert plan_delta(st, {"r1": "1", "r2": "2"}).empty


def test_delta_explicit_wildcard_for_named_type_and_empty_first_for_routes() -> None:
    st = TypeState(types.ROUTE)
    apply_delta_subscription(st, [], [], first=True)
    assert not st.wildcard  # RDS is never implicitly wildcard
    apply_delta_subscription(st, ["*"], [], first=False)
    assert st.wildcard


def test_rejected_content_is_sent_again_only_after_another_version_was_accepted() -> None:
    from meshgate.xds.protocol import acknowledge

    st = TypeState(types.CLUSTER, nonce_sent="n1", version_sent="bad")
    st.rejected_version = "bad"  # NACKed
    assert not should_push(st, "bad")  # a reload with the same content: never re-sent
    assert should_push(st, "good")
    st.version_sent = "good"
    acknowledge(st, "good")
    assert (st.version_acked, st.rejected_version) == ("good", None)
    assert should_push(st, "bad")  # the content came back as a change: sent (once)
