"""What a supervisor may send the delegation endpoint, and how a bad request is refused."""

from __future__ import annotations

from typing import Any

import pytest

from meshgate.delegation.registry import Request
from meshgate.delegation.rights import DelegationError, RuleGrant
from meshgate.delegation.service import parse_request
from meshgate.policy.model import Delegation


def test_a_request_parses() -> None:
    ask = parse_request(
        {
            "name": "web-1",
            "ttl": "15m",
            "rules": [{"rule": 1, "methods": ["GET"], "paths": ["/a/*"]}, {"rule": 0}],
            "delegation": {"maxSubAgents": 1, "maxTtl": "5m"},
        }
    )
    assert ask == Request(
        "web-1",
        900,
        (RuleGrant(1, ("GET",), ("/a/*",)), RuleGrant(0)),
        Delegation(1, 300),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "x", "ttl": "1m", "rules": [{"rule": -1}]}, "rules.0.rule"),
        ({"name": "x", "ttl": "1m", "rules": [{"rule": "0"}]}, "rules.0.rule"),
        ({"name": "x", "ttl": "1m", "rules": [], "admin": True}, "admin: Extra inputs"),
        ({"name": "x", "ttl": "forever", "rules": []}, "ttl"),
        ({"ttl": "1m", "rules": []}, "name: Field required"),
        ([1, 2], "body|Input should be"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(DelegationError, match=message):
        parse_request(body)
