"""The cyclic garbage collector's settings for the control-plane process.

A serving control plane holds a large, long-lived heap: ~125 tracked objects per connected
stream (grpc.aio and asyncio per-call objects), 1.3 million at 10,000 streams, where a full
collection stops the event loop for about a second. CPython (3.11) runs one whenever objects
promoted to the oldest generation since the last one exceed a quarter of it, checked after
every `threshold2` collections of the middle one; the default (10) lets the objects a mesh-wide
push replaces (each stream's new waiters, the new snapshots) bring a full collection into
nearly every such push. Checking it ten times less often, and never scanning what start-up
made (modules, the first build), keeps cyclic garbage of the young generations collected as
before; cycles that reach the oldest one wait longer (streams that disconnected), a bounded
amount of memory.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 700  # CPython's default
MIDDLE_THRESHOLD = 10  # CPython's default
OLD_THRESHOLD = 100  # CPython's default is 10


def tune_collector() -> None:
    """Call once the process has started serving (after the first build): collect, freeze
    what exists (so later full collections skip it), check the oldest generation less often."""
    gc.collect()  # nothing cyclic is left for the freeze to keep forever
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
