"""Which batches retention may delete: a pure decision over batch rows.

Only whole batches go, and only a prefix of the chain (the oldest ones, in seq order, stopping at
the first batch holding any record at or after the cutoff), so what remains is still one
unbroken chain hanging from the anchor: the last deleted batch's hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetentionPlan:
    seq: int  # the last batch to delete: it becomes the anchor
    last_id: int  # records with id <= last_id go
    hash: str  # the anchor hash the first remaining batch chains to
    batches: int


def plan_retention(rows: Iterable[Sequence[Any]], cutoff_us: int) -> RetentionPlan | None:
    """`rows` are (seq, last_id, max_ts_us, hash) in seq order; None when nothing is old enough.

    A batch's records arrive in append order, not timestamp order, so a recent batch can stop
    retention even when later ones are older: the chain stays contiguous."""
    plan: RetentionPlan | None = None
    for seq, last_id, max_ts_us, hash_ in rows:
        if int(max_ts_us) >= cutoff_us:
            break
        count = plan.batches + 1 if plan else 1
        plan = RetentionPlan(int(seq), int(last_id), str(hash_), count)
    return plan
