"""Outside systems (Consul, Vault, git) behind small Protocols, each with an in-memory twin.

The rest of meshgate depends on the Protocol only; the real client (py-consul, hvac, the git
CLI) and its twin (`InMemoryConsul`, `InMemoryVaultKV`, `InMemoryVaultPKI`, `InMemoryGit`) are
interchangeable, which contract tests prove by running one test body against both.
"""
