"""The JSON messages of the LimitStore gRPC service (`store_service`, `remote_store`).

Compact JSON over gRPC generic handlers: no .proto to compile, and a message is a few dozen
bytes. Decoding is strict (a wrong type is ValueError), on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from meshgate.pacing.store import BudgetState, Charge, RateDecision, Reservation

SERVICE = "meshgate.limits.v1.LimitStore"
HIT, RESERVE, SETTLE, BUDGETS = "Hit", "Reserve", "Settle", "Budgets"


def dump(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def load(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not a JSON message: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("a message is a JSON object")
    return data


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _num(v: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return v


def hit_request(key: str, requests: int, per_seconds: int, want: int = 1) -> bytes:
    return dump({"k": key, "n": requests, "p": per_seconds, "w": want})


def parse_hit_request(data: Mapping[str, Any]) -> tuple[str, int, int, int]:
    # "w" absent: a pacer from before leases, which takes one token per request
    return _str(data["k"]), _int(data["n"]), _int(data["p"]), _int(data.get("w", 1))


def decision(d: RateDecision) -> bytes:
    return dump({"a": d.allowed, "l": d.limit, "r": d.remaining, "s": d.reset_s, "g": d.granted})


def parse_decision(data: Mapping[str, Any]) -> RateDecision:
    if not isinstance(data["a"], bool):
        raise ValueError("bad decision")
    granted = _int(data.get("g", int(data["a"])))
    if data["a"] != (granted > 0):
        raise ValueError("bad decision: allowed and granted disagree")
    return RateDecision(data["a"], _int(data["l"]), _int(data["r"]), _num(data["s"]), granted)


def reserve_request(reservation: str, charges: Sequence[Charge], ttl_s: float) -> bytes:
    rows = [[c.budget, c.limit, c.amount, c.window_start, c.window_end] for c in charges]
    return dump({"id": reservation, "t": ttl_s, "c": rows})


def parse_reserve_request(data: Mapping[str, Any]) -> tuple[str, list[Charge], float]:
    charges = []
    for row in _list(data["c"]):
        budget, limit, amount, start, end = _list(row)
        charges.append(Charge(_str(budget), _int(limit), _int(amount), _int(start), _int(end)))
    return _str(data["id"]), charges, _num(data["t"])


def _state_row(s: BudgetState) -> list[Any]:
    return [s.budget, s.window_start, s.window_end, s.limit, s.spent, s.reserved]


def _parse_state(row: Any) -> BudgetState:
    budget, start, end, limit, spent, reserved = _list(row)
    return BudgetState(
        _str(budget), _int(start), _int(end), _int(limit), _int(spent), _int(reserved)
    )


def reservation(r: Reservation) -> bytes:
    return dump({"a": r.admitted, "f": r.refused, "s": [_state_row(s) for s in r.states]})


def parse_reservation(data: Mapping[str, Any]) -> Reservation:
    refused = data["f"]
    if not isinstance(data["a"], bool) or not (refused is None or isinstance(refused, str)):
        raise ValueError("bad reservation")
    return Reservation(data["a"], refused, tuple(_parse_state(r) for r in _list(data["s"])))


def settle_request(reservation: str, actual: Mapping[str, int]) -> bytes:
    return dump({"id": reservation, "u": dict(actual)})


def parse_settle_request(data: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
    usage = data["u"]
    if not isinstance(usage, dict):
        raise ValueError("usage is a JSON object")
    return _str(data["id"]), {_str(k): _int(v) for k, v in usage.items()}


def budgets_request(prefix: str) -> bytes:
    return dump({"p": prefix})


def parse_budgets_request(data: Mapping[str, Any]) -> str:
    return _str(data["p"])


def states(items: Sequence[BudgetState]) -> bytes:
    return dump({"s": [_state_row(s) for s in items]})


def parse_states(data: Mapping[str, Any]) -> list[BudgetState]:
    return [_parse_state(r) for r in _list(data["s"])]
