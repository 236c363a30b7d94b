"""The `delegation` field of an AgentPolicy: whether, and how much, an agent may delegate.

Sub-agents are not written in policy: a supervisor creates them at run time (docs/policy.md,
"Delegation"); policy only bounds how many it may hold at once and for how long.
"""

from __future__ import annotations

import datetime as dt

from meshgate import durations
from meshgate.policy.syntax import fail

MAX_SUB_AGENTS = 1000
MAX_TTL_SECONDS = 30 * 86_400  # a sub-agent's certificate lives no longer than any other


def sub_agent_count(v: int) -> int:
    if not 1 <= v <= MAX_SUB_AGENTS:
        raise fail(f"must be between 1 and {MAX_SUB_AGENTS}")
    return v


def ttl_seconds(text: str, what: str = "maxTtl") -> int:
    """Whole seconds of a duration such as `15m`, `1h`, `7d` (at most 30d)."""
    return durations.parse_seconds(
        text,
        what,
        units="smhd",
        bare=False,
        fractions=False,
        positive=True,
        maximum=dt.timedelta(seconds=MAX_TTL_SECONDS),
    )


def max_ttl(v: str) -> str:
    try:
        ttl_seconds(v)
    except durations.DurationError:
        raise fail("must be a duration such as 15m, 1h or 7d, at most 30d") from None
    return v
