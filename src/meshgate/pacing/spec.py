"""What a gateway route asks of the pacer, carried on the route itself. Pure: no I/O.

The pacer holds no policy. Every limit arrives with the request it applies to, so a pacer
never acts on a stale copy of the policy and needs no connection of its own to the control
plane for configuration:
- global rate limits are a query string (`limits_query`) in the route's config of the
  gateway's limits filter, which sends it to the pacer (`pacer.limits_http`);
- budgets, concurrency caps, LLM rules and MCP tool rules are one `PaceSpec`, JSON in the
  ext_proc gRPC metadata `PACE_METADATA` that the route's per-route ext_proc config adds.
Routes are per agent (they match the agent identity taken from the verified certificate), so
the agent named in a spec is the caller; an agent cannot send or alter either.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime as dt
import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlencode

from meshgate.policy.model import Price as Price  # re-exported: USD per 1M tokens of a glob

Unit = Literal["requests", "tokens", "input_tokens", "output_tokens", "cost_micro_usd"]
Window = Literal["hour", "day", "month"]
FailureMode = Literal["open", "closed"]
LlmApi = Literal["openai", "anthropic"]

UNITS: tuple[Unit, ...] = ("requests", "tokens", "input_tokens", "output_tokens", "cost_micro_usd")
WINDOWS: tuple[Window, ...] = ("hour", "day", "month")

PACE_METADATA = "x-meshgate-pace"  # ext_proc gRPC initial metadata holding a PaceSpec's JSON
PACER_CLUSTER = "meshgate-pacer"  # the gateway bootstrap's static cluster to the pacer's socket
# ... and to its global-limits socket (HTTP/1.1: `pacer.limits_http`)
LIMITS_CLUSTER = "meshgate-pacer-limits"
LIMITS_SOCKET = "limits.sock"  # beside the pacer's ext_proc socket, in the same private dir
LIMITS_PATH = "/v1/limits"
LIMITS_VERDICT_HEADER = "x-meshgate-limit"  # the pacer's answer: ok | over | unavailable | invalid
DYNAMIC_METADATA_NAMESPACE = "meshgate.pacer"  # what the pacer tells the access log


def limits_socket(pacer_socket: Path) -> Path:
    """Where the pacer answers global limits: beside its ext_proc socket (same private dir)."""
    return pacer_socket.with_name(LIMITS_SOCKET)


# Envoy response code details of the pacer's refusals; the audit decision is the part before ":"
OVER_BUDGET = "over_budget"
QUEUE_TIMEOUT = "queue_timeout"
MODEL_NOT_ALLOWED = "model_not_allowed"
MAX_TOKENS_EXCEEDED = "max_tokens_exceeded"
BODY_UNREADABLE = "llm_body_unreadable"  # an LLM request body the pacer could not parse
STORE_UNAVAILABLE = "limit_store_unavailable"  # a fail-closed budget with its store down
# MCP refusals (the audit reason comes from xds.access_log.LOCAL_REFUSALS). None starts with
# "mcp_": the gateway's local replies rewrite those (they are Envoy's MCP filter's)
MCP_TOOL_DENIED = "tool_denied"  # a tools/call no rule allows
MCP_ARGUMENT_REFUSED = "argument_refused"  # a listed tool, arguments its rules refuse
MCP_BODY_INVALID = "jsonrpc_unreadable"  # not one strict JSON-RPC message
MCP_HEADER_MISMATCH = "jsonrpc_header_mismatch"  # Mcp-Method / Mcp-Name disagree with the body


@dataclass(frozen=True)
class GlobalLimit:
    """A token bucket shared by every gateway replica: `requests` per `per_seconds`, bursting
    to `requests`. `key` names the bucket (one per agent and rule)."""

    key: str
    requests: int
    per_seconds: int
    on_store_failure: FailureMode = "open"


def limits_query(limits: list[GlobalLimit]) -> str:
    """The query string the gateway's limits filter sends the pacer: per limit, in order,
    `key`, `limit` (requests/seconds) and `failure` (open|closed)."""
    return urlencode(
        [
            pair
            for lim in limits
            for pair in (
                ("key", lim.key),
                ("limit", f"{lim.requests}/{lim.per_seconds}"),
                ("failure", lim.on_store_failure),
            )
        ]
    )


MAX_LIMITS_PER_REQUEST = 8


def parse_limits_query(query: str) -> list[GlobalLimit]:
    """The limits a query describes; ValueError for anything else (the pacer refuses it)."""
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=24)
    if not pairs or len(pairs) % 3 or len(pairs) > 3 * MAX_LIMITS_PER_REQUEST:
        raise ValueError(f"not a meshgate limits query: {query!r:.200}")
    out = []
    for i in range(0, len(pairs), 3):
        (k1, key), (k2, limit), (k3, failure) = pairs[i : i + 3]
        requests, _, per = limit.partition("/")
        if (k1, k2, k3) != ("key", "limit", "failure") or not key:
            raise ValueError(f"not a meshgate limits query: {query!r:.200}")
        if not (requests.isdigit() and per.isdigit()) or failure not in ("open", "closed"):
            raise ValueError(f"bad meshgate limit: {query!r:.200}")
        if int(requests) < 1 or int(per) < 1:
            raise ValueError(f"bad meshgate limit: {query!r:.200}")
        out.append(GlobalLimit(key, int(requests), int(per), cast(FailureMode, failure)))
    return out


@dataclass(frozen=True)
class BudgetSpec:
    """A cap on what one counter may spend per calendar `window` (UTC). `id` names the counter:
    `agent/<agent>/<name>`, `group/<group>/<name>` (shared by the group's agents) or
    `rule/<agent>/<rule index>/<name>`. Tokens and cost are charged only by LLM calls."""

    id: str
    unit: Unit
    limit: int
    window: Window
    on_store_failure: FailureMode = "closed"


@dataclass(frozen=True)
class ConcurrencySpec:
    """An in-flight cap, per gateway replica. `fair`: waiters are admitted round-robin between
    agents; `capacity`: waiting here is waiting for gateway capacity (the autoscaling signal)."""

    key: str
    max: int
    max_wait_ms: int
    fair: bool = False
    capacity: bool = False


@dataclass(frozen=True)
class LlmSpec:
    api: LlmApi
    models: tuple[str, ...] = ()  # globs the agent may request; empty: any model
    max_tokens: int | None = None  # injected when absent, refused when larger
    prices: tuple[Price, ...] = ()  # first matching glob wins


@dataclass(frozen=True)
class PaceSpec:
    agent: str
    destination: str
    budgets: tuple[BudgetSpec, ...] = ()
    concurrency: tuple[ConcurrencySpec, ...] = ()  # acquired in this order
    llm: LlmSpec | None = None
    # MCP tool rules: the agent's ToolPolicy for this destination, as `mcp.decision.encode`
    # wrote it (the pacer decodes and caches it); None: not an MCP tool route
    mcp: str | None = None
    # the route is the agent's tool refusal: the pacer answers every call MCP's way, never
    # forwards it (its route leads to no cluster, should the pacer let it through)
    mcp_refuse: bool = False
    # shadow mode: the tool rules of the policy's shadow version for this agent and
    # destination, when they differ; the pacer decides with them too, records what they would
    # have refused (`shadow_refused`) and never acts on it
    shadow_mcp: str | None = None


def encode(spec: PaceSpec) -> str:
    """Compact, stable JSON (ASCII: it travels as a gRPC metadata value)."""
    data: dict[str, Any] = {"agent": spec.agent, "destination": spec.destination}
    if spec.budgets:
        data["budgets"] = [
            [b.id, b.unit, b.limit, b.window, b.on_store_failure] for b in spec.budgets
        ]
    if spec.concurrency:
        data["concurrency"] = [
            [c.key, c.max, c.max_wait_ms, c.fair, c.capacity] for c in spec.concurrency
        ]
    if spec.llm is not None:
        llm = spec.llm
        data["llm"] = {
            "api": llm.api,
            "models": list(llm.models),
            "maxTokens": llm.max_tokens,
            "prices": [[p.model, p.input, p.output] for p in llm.prices],
        }
    if spec.mcp is not None:
        data["mcpz"] = _pack(spec.mcp)
    if spec.mcp_refuse:
        data["mcpRefuse"] = True
    if spec.shadow_mcp is not None:
        data["shadowMcpz"] = _pack(spec.shadow_mcp)
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True)


def decode(text: str) -> PaceSpec:
    """The spec `encode` wrote; ValueError for anything else (the pacer then refuses)."""
    try:
        data = json.loads(text)
        budgets = tuple(
            BudgetSpec(_str(i), _choice(u, UNITS), _positive(n), _choice(w, WINDOWS), _mode(f))
            for i, u, n, w, f in data.get("budgets", [])
        )
        concurrency = tuple(
            ConcurrencySpec(_str(k), _positive(m), _natural(w), _bool(fa), _bool(ca))
            for k, m, w, fa, ca in data.get("concurrency", [])
        )
        llm = None
        if "llm" in data:
            raw = data["llm"]
            max_tokens = raw["maxTokens"]
            llm = LlmSpec(
                api=_choice(raw["api"], ("openai", "anthropic")),
                models=tuple(_str(m) for m in raw["models"]),
                max_tokens=None if max_tokens is None else _positive(max_tokens),
                prices=tuple(Price(_str(m), _str(i), _str(o)) for m, i, o in raw["prices"]),
            )
        mcp = _unpack(_str(data["mcpz"])) if "mcpz" in data else None
        mcp_refuse = _bool(data.get("mcpRefuse", False))
        if mcp_refuse and mcp is None:
            raise ValueError("mcpRefuse without mcp")
        shadow_mcp = _unpack(_str(data["shadowMcpz"])) if "shadowMcpz" in data else None
        return PaceSpec(
            _str(data["agent"]),
            _str(data["destination"]),
            budgets,
            concurrency,
            llm,
            mcp,
            mcp_refuse,
            shadow_mcp,
        )
    except (ValueError, KeyError, TypeError, AttributeError, zlib.error, binascii.Error) as e:
        raise ValueError(f"bad pace spec: {e}") from None


# Tool rules travel compressed: gRPC metadata is bounded (a few tens of KiB between Envoy and
# the pacer), and an agent's rules repeat the same keys for every tool and argument.
MAX_MCP_TEXT = 1 << 20


def _pack(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _unpack(packed: str) -> str:
    inflate = zlib.decompressobj()
    data = inflate.decompress(base64.b64decode(packed, validate=True), MAX_MCP_TEXT)
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("mcp tool rules too large or truncated")
    return data.decode("utf-8")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected a boolean, got {v!r}")
    return v


def _natural(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected an integer >= 0, got {v!r}")
    return v


def _positive(v: Any) -> int:
    if _natural(v) < 1:
        raise ValueError(f"expected an integer >= 1, got {v!r}")
    return cast(int, v)


def _mode(v: Any) -> FailureMode:
    return cast(FailureMode, _choice(v, ("open", "closed")))


def _choice(v: Any, choices: tuple[str, ...]) -> Any:
    if v not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
    return v


def window_bounds(window: Window, now: float) -> tuple[int, int]:
    """The UTC calendar window holding `now` (epoch seconds): [start, end) in epoch seconds."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if window == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
    elif window == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    else:
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + dt.timedelta(days=days)
    return int(start.timestamp()), int(end.timestamp())
