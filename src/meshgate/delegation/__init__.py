"""Delegation: a supervisor agent starts sub-agents holding a subset of its own rights.

`names` (how a sub-agent's name and SPIFFE ID name its parents), `rights` (the checked subset),
`registry` (sub-agents as a persisted runtime input), `expand` (policy + sub-agents -> the
model translation sees), `service` (the control plane's endpoint, reached through the gateway).
"""
