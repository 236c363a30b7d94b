"""Which limit store a process counts in, from one setting (`--limit-store` or the env)."""

from __future__ import annotations

from pathlib import Path

from meshgate.errors import ConfigError
from meshgate.pacing.store import LimitStore
from meshgate.urls import without_password

LIMIT_STORE_ENV = "MESHGATE_LIMIT_STORE"
# What one store call may add to a request before the limit's failure mode decides, and how
# many calls may wait at once (beyond that: the failure mode at once, no pile-up). A burst of
# a few hundred concurrent requests per replica is normal, so the cap is well above it.
# 0.2 s timed out on a 2-core gateway under a burst: event-loop lag, not Redis
STORE_TIMEOUT_S = 0.5
STORE_MAX_IN_FLIGHT = 2048


def open_limit_store(url: str, password_file: Path | None = None) -> LimitStore:
    """`redis://...` / `rediss://...`: Redis, shared by every replica; empty: an in-process
    store (the control plane's embedded one), and `password_file` is not read (a deployment
    passes both from one optional Secret: without it there is no URL and no file). Opening
    connects lazily: nothing blocks here."""
    if not url:
        from meshgate.pacing.memory_store import MemoryStore

        return MemoryStore()
    from meshgate.pacing.redis_store import RedisStore

    try:
        return RedisStore(
            url,
            password_file=password_file,
            timeout_s=STORE_TIMEOUT_S,
            max_in_flight=STORE_MAX_IN_FLIGHT,
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--limit-store: {without_password(str(exc), url)}") from None
