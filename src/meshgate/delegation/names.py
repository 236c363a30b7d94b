"""Sub-agent names: the parent chain is part of the name, so it is part of the identity.

A sub-agent `web-1` of `supervisor` is the agent `supervisor.web-1` everywhere meshgate names
agents (node ids, route names, audit `agent`), and its SPIFFE ID is
`spiffe://<td>/agent/supervisor/sub/web-1`. Policy agent names are DNS labels (no dots), so no
policy agent can be mistaken for a sub-agent, and a certificate names its whole chain: nothing
an agent sends can change it. Pure.
"""

from __future__ import annotations

import re

SEPARATOR = "."
SUB = "sub"  # the SPIFFE path segment between a parent and its sub-agent
MAX_DEPTH = 3  # sub-agents below a policy agent (supervisor.a.b.c at most)
LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_LABEL_RE = re.compile(LABEL)
# a policy agent or a sub-agent: labels joined by dots
AGENT = rf"{LABEL}(\.{LABEL}){{0,{MAX_DEPTH}}}"
_AGENT_RE = re.compile(AGENT)
# the path of an agent SPIFFE ID after `agent/`: labels joined by `/sub/`
_PATH_RE = re.compile(rf"{LABEL}(/{SUB}/{LABEL}){{0,{MAX_DEPTH}}}")


def is_label(value: str) -> bool:
    return _LABEL_RE.fullmatch(value) is not None


def is_agent_name(value: str) -> bool:
    """A policy agent name or a sub-agent name within MAX_DEPTH."""
    return _AGENT_RE.fullmatch(value) is not None


def chain(agent: str) -> tuple[str, ...]:
    """(`supervisor`, `web-1`) for `supervisor.web-1`: the policy agent first."""
    return tuple(agent.split(SEPARATOR))


def parent_of(agent: str) -> str | None:
    head, sep, _ = agent.rpartition(SEPARATOR)
    return head if sep else None


def root_of(agent: str) -> str:
    return agent.partition(SEPARATOR)[0]


def depth(agent: str) -> int:
    """0 for a policy agent, 1 for its sub-agents, ..."""
    return agent.count(SEPARATOR)


def sub_agent_name(parent: str, name: str) -> str:
    return f"{parent}{SEPARATOR}{name}"


def spiffe_path(agent: str) -> str:
    """`supervisor/sub/web-1` for `supervisor.web-1` (the part after `agent/`)."""
    return f"/{SUB}/".join(chain(agent))


def agent_from_path(path: str) -> str | None:
    """The agent name of a SPIFFE path after `agent/`, or None when it is not one we issue."""
    if _PATH_RE.fullmatch(path) is None:
        return None
    return SEPARATOR.join(path.split(f"/{SUB}/"))


def chain_text(agent: str) -> str:
    """`supervisor>web-1`: how audit records show who delegated to whom; "" for a policy agent."""
    parts = chain(agent)
    return ">".join(parts) if len(parts) > 1 else ""
