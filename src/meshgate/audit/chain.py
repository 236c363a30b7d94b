"""The hash chain over appended batches, and its verification. Pure: no I/O.

Every `append` writes one batch ("segment"). A batch stores the SHA-256 digest of each of its
records' canonical encodings (in id order) and

    hash = sha256(prev_hash || seq || first_id || count || digest_1 || ... || digest_n)

so an edited record changes its digest, a moved record lands at the wrong position, a deleted
record leaves a hole in the batch's contiguous id range, and a deleted batch leaves a seq gap and
a prev_hash that no longer matches. The per-record digests are what let `verify` name the record
instead of only the batch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshgate.audit.record import VALUES_KEY, AuditRecord

GENESIS = "0" * 64
DIGEST_SIZE = 32
MAX_PROBLEMS = 100  # a wrecked log would otherwise produce one line per record

ProblemKind = Literal[
    "edited",
    "deleted",
    "reordered",
    "batch_missing",
    "chain_broken",
    "batch_tampered",
    "unchained",
    "head_mismatch",
]


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_US = dt.timedelta(microseconds=1)


def _no_default(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encoder() -> Callable[[tuple[Any, ...]], str]:
    """`json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode`, with the C encoder
    it builds on every call built once: encoding is a fifth of the append path. Same bytes
    (the same C code; `test_audit_chain` pins them); no circular check, the values are flat."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # no C accelerator (another interpreter)
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    encode = c_make_encoder(
        None, _no_default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    return lambda values: "".join(encode(values, 0))


_ENCODE = _encoder()


def to_micros(when: dt.datetime) -> int:
    """UTC microseconds since the epoch: exact, sortable, the same integer in every store."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return (when - EPOCH) // ONE_US


def from_micros(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=micros)


def record_values(r: AuditRecord) -> tuple[Any, ...]:
    """The record's fields in their fixed order, timestamp as UTC microseconds: what the
    canonical encoding covers and what a store row holds after its id (kept by
    `AuditRecord.trusted`, which the ingest path builds records with)."""
    kept: tuple[Any, ...] | None = r.__dict__.get(VALUES_KEY)
    if kept is not None:
        return kept
    return (
        to_micros(r.timestamp), r.request_id, r.agent, r.spiffe_id, r.destination, r.host,
        r.method, r.path, r.status, r.decision, r.reason, r.bytes_sent, r.bytes_received,
        float(r.duration_ms), r.policy_version, r.gateway, r.mcp_method, r.mcp_tool,
        r.model, r.tokens_in, r.tokens_out, r.cost_micro_usd, r.mcp_args_digest,
        r.shadow_decision, r.shadow_reason,
        r.delegation_chain,
    )  # fmt: skip


BASE_FIELDS = 16  # values before the MCP fields, which were added later
# Where each group of later fields ends: (mcp_method, mcp_tool), then the pacer's and the tool
# call's fields, then the shadow decision, then the delegation chain. A record encodes up to its
# last group with a value set, so a record stored before a group existed still encodes, and
# verifies, exactly as it did.
GROUP_ENDS = (18, 23, 25, 26)


def _trimmed(values: tuple[Any, ...]) -> tuple[Any, ...]:
    end = BASE_FIELDS
    start = BASE_FIELDS
    for group_end in GROUP_ENDS:
        if any(values[start:group_end]):
            end = group_end
        start = group_end
    return values[:end] if end < len(values) else values


def encode_values(values: tuple[Any, ...]) -> bytes:
    """Compact JSON of `record_values`: independent of the store, floats round-trip exactly.
    Only up to the last group of fields in use (`GROUP_ENDS`): records stored by earlier
    versions still verify."""
    return _ENCODE(_trimmed(values)).encode()  # a tuple encodes as the same array


def values_digest(values: tuple[Any, ...]) -> bytes:
    """sha256(encode_values(values)), once per appended record: one call fewer. It depends on
    the record alone, so the ingest decoder computes it (in its own process) for the store."""
    return hashlib.sha256(_ENCODE(_trimmed(values)).encode()).digest()


def canonical(record: AuditRecord) -> bytes:
    """One byte string per record: the chain's wire format (a test pins it)."""
    return encode_values(record_values(record))


def digest(record: AuditRecord) -> bytes:
    return hashlib.sha256(canonical(record)).digest()


def batch_hash(prev_hash: str, seq: int, first_id: int, digests: bytes) -> str:
    """The chain link: covers the predecessor, the batch's position and every record digest."""
    count = len(digests) // DIGEST_SIZE
    h = hashlib.sha256(prev_hash.encode())
    h.update(f"|{seq}|{first_id}|{count}|".encode())
    h.update(digests)
    return h.hexdigest()


@dataclass(frozen=True)
class Batch:
    """One stored batch row."""

    seq: int
    first_id: int
    last_id: int
    count: int
    prev_hash: str
    hash: str
    digests: bytes
    min_ts_us: int
    max_ts_us: int


@dataclass(frozen=True)
class ChainState:
    """Where the chain stands: the retention anchor and the head, both kept in one row."""

    anchor_seq: int = 0
    anchor_hash: str = GENESIS
    anchor_last_id: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    head_last_id: int = 0


def make_batch(
    state: ChainState,
    records: Sequence[AuditRecord],
    values: Sequence[tuple[Any, ...]] = (),
    digests: Sequence[bytes] | None = None,
) -> Batch:
    """The next batch after `state` for records that will get ids head_last_id+1 onwards.

    `values` may pass in `record_values` of each record, already computed for the insert, and
    `digests` their `values_digest`s, computed where they were decoded."""
    values = values or [record_values(r) for r in records]
    joined = b"".join(digests if digests is not None else [values_digest(v) for v in values])
    if len(joined) != DIGEST_SIZE * len(values):
        raise ValueError(f"{len(values)} records but {len(joined) // DIGEST_SIZE} digests")
    seq, first_id = state.head_seq + 1, state.head_last_id + 1
    stamps = [v[0] for v in values]
    return Batch(
        seq=seq,
        first_id=first_id,
        last_id=first_id + len(values) - 1,
        count=len(values),
        prev_hash=state.head_hash,
        hash=batch_hash(state.head_hash, seq, first_id, joined),
        digests=joined,
        min_ts_us=min(stamps),
        max_ts_us=max(stamps),
    )


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    message: str
    seq: int | None = None
    record_id: int | None = None
    request_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class VerifyReport:
    records: int = 0
    batches: int = 0
    anchor_seq: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    truncated: bool = False  # more than MAX_PROBLEMS problems; the rest were not listed

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.truncated = True

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "batches": self.batches,
            "anchor_seq": self.anchor_seq,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "problems": [p.to_json() for p in self.problems],
            "truncated": self.truncated,
        }


class Verifier:
    """Fed batches in seq order with their records; collects every inconsistency it can name.

    The caller does the I/O: `gap_range()` says which record ids to look for between batches,
    `batch()` checks one batch against the records stored in its id range, `finish()` checks the
    head row and the records after it."""

    def __init__(self, state: ChainState) -> None:
        self.state = state
        self.report = VerifyReport(anchor_seq=state.anchor_seq)
        self._seq = state.anchor_seq
        self._hash = state.anchor_hash
        self._last_id = state.anchor_last_id

    def batch(self, batch: Batch, rows: Iterable[tuple[int, AuditRecord]]) -> None:
        report = self.report
        if batch.seq != self._seq + 1:
            missing = (
                f"{self._seq + 1}"
                if batch.seq == self._seq + 2
                else (f"{self._seq + 1}..{batch.seq - 1}")
            )
            report.add(
                Problem(
                    "batch_missing",
                    f"batch {missing} missing before batch {batch.seq}",
                    seq=batch.seq,
                )
            )
        elif batch.prev_hash != self._hash:
            report.add(
                Problem(
                    "chain_broken",
                    f"batch {batch.seq} does not chain to batch "
                    f"{self._seq}: prev_hash {batch.prev_hash[:12]}.. expected "
                    f"{self._hash[:12]}..",
                    seq=batch.seq,
                )
            )
        expected_hash = batch_hash(batch.prev_hash, batch.seq, batch.first_id, batch.digests)
        span = batch.last_id - batch.first_id + 1
        if (
            expected_hash != batch.hash
            or batch.count * DIGEST_SIZE != len(batch.digests)
            or span != batch.count
        ):
            report.add(
                Problem(
                    "batch_tampered",
                    f"batch {batch.seq}'s row was altered: its "
                    "hash, count or id range does not match its contents",
                    seq=batch.seq,
                )
            )
        if batch.seq == self._seq + 1 and batch.first_id != self._last_id + 1:
            report.add(
                Problem(
                    "batch_tampered",
                    f"batch {batch.seq} starts at record id "
                    f"{batch.first_id}, expected {self._last_id + 1}",
                    seq=batch.seq,
                )
            )
        self._records(batch, rows)
        report.batches += 1
        self._seq, self._hash, self._last_id = batch.seq, batch.hash, batch.last_id

    def _records(self, batch: Batch, rows: Iterable[tuple[int, AuditRecord]]) -> None:
        stored = [
            batch.digests[i : i + DIGEST_SIZE] for i in range(0, len(batch.digests), DIGEST_SIZE)
        ]
        positions = {d: i for i, d in enumerate(stored)}
        seen: set[int] = set()
        stamps: list[int] = []
        intact = 0
        for record_id, record in rows:
            self.report.records += 1
            seen.add(record_id)
            stamps.append(to_micros(record.timestamp))
            pos = record_id - batch.first_id
            actual = digest(record)
            if 0 <= pos < len(stored) and stored[pos] == actual:
                intact += 1
                continue
            where = f"record id {record_id} (request_id {record.request_id!r}) in batch {batch.seq}"
            other = positions.get(actual)
            if other is not None:
                self.report.add(
                    Problem(
                        "reordered",
                        f"{where} holds the record appended as id {batch.first_id + other}",
                        batch.seq,
                        record_id,
                        record.request_id,
                    )
                )
            else:
                self.report.add(
                    Problem(
                        "edited", f"{where} was edited", batch.seq, record_id, record.request_id
                    )
                )
        if intact == batch.count and (min(stamps, default=0), max(stamps, default=0)) != (
            batch.min_ts_us,
            batch.max_ts_us,
        ):  # retention trusts these: a forged max_ts_us could make it drop recent records
            self.report.add(
                Problem(
                    "batch_tampered",
                    f"batch {batch.seq}'s time range does not match its records",
                    seq=batch.seq,
                )
            )
        for record_id in range(batch.first_id, batch.first_id + len(stored)):
            if record_id not in seen:
                self.report.add(
                    Problem(
                        "deleted",
                        f"record id {record_id} of batch {batch.seq} is missing "
                        f"({len(seen)} of {batch.count} records present)",
                        batch.seq,
                        record_id,
                    )
                )

    @property
    def last_id(self) -> int:
        """The last record id covered by the batches checked so far."""
        return self._last_id

    def gap_range(self, batch: Batch) -> tuple[int, int] | None:
        """Ids between the last checked batch and `batch` that no batch covers, if any."""
        if batch.first_id > self._last_id + 1:
            return self._last_id + 1, batch.first_id - 1
        return None

    def unchained(self, rows: Iterable[tuple[int, str]]) -> None:
        """Records outside every batch: inserted behind the chain's back, or left by a deleted
        batch."""
        for record_id, request_id in rows:
            self.report.records += 1
            self.report.add(
                Problem(
                    "unchained",
                    f"record id {record_id} (request_id {request_id!r}) is in no batch",
                    record_id=record_id,
                    request_id=request_id,
                )
            )

    def finish(self) -> VerifyReport:
        """Compare the last batch seen with the head row: catches deleted trailing batches."""
        state, report = self.state, self.report
        if (self._seq, self._hash) != (state.head_seq, state.head_hash):
            report.add(
                Problem(
                    "head_mismatch",
                    f"the chain ends at batch {self._seq} but the "
                    f"head row names batch {state.head_seq}: trailing batches "
                    "deleted or the head row altered",
                    seq=state.head_seq,
                )
            )
        report.head_seq, report.head_hash = self._seq, self._hash
        return report
