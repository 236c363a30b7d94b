"""Policy as YAML in git, compiled into the immutable `model.PolicyModel`.

Kept import-light on purpose (importing `meshgate.policy.model` must not pull in YAML or
pydantic). Entry points: `loader` (texts / directory -> model), `gitsource` (git source
strings, which committed files are policy; git itself runs in `meshgate.adapters.git`),
`plan` (diff), `lint` (guardrails), `serialize` (model <-> JSON).
"""
