"""Policy as YAML in git, compiled into the immutable `model.PolicyModel`.

Kept import-light on purpose (importing `meshgate.policy.model` must not pull in YAML or
pydantic). Entry points: `loader` (texts / directory -> model), `gitsource` (commit -> model),
`plan` (diff), `lint` (guardrails), `serialize` (model <-> JSON).
"""
