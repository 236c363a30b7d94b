"""Audit store throughput and query latency, for SQLite and PostgreSQL.

What: append ``--records`` synthetic records (50 agents, 100 destinations, 30 days, arriving in
time order with jitter, ~10% denied) in batches of ``--batch`` through the store's real
``append`` (dedup lookup; insert: SQLite in multi-row INSERTs of up to 500 rows, PostgreSQL in
one COPY; batch row and chain link; commit per batch), then time the queries the CLI and admin
API run, each ``--queries`` times with random parameters:

* agent+time  -- one agent over a random 1-hour window, newest first, limit 100;
* decision    -- ``decision=denied`` newest first, limit 100 (the "what got refused" view);
* decision+24h -- ``decision=denied`` over a random 24-hour window, limit 100;
* summary 24h -- requests per agent x destination x decision over a random 24-hour window;

and once: ``verify`` over the whole store. Ingest is reported overall and for the last tenth
(the sustained rate with the store already near full size); record generation is not timed.

Why: the issue's targets are ingest >= 20,000 records/s into SQLite and the filtered queries
under 50 ms over 1,000,000 stored records. PASS/MISS is judged on p95.

Usage::

    .venv/bin/python benchmarks/audit.py [--records 1000000] [--batch 2000] [--queries 200] \\
        [--stores sqlite,postgres] [--postgres URL]

PostgreSQL defaults to $MESHGATE_TEST_POSTGRES or the local test server; the benchmark works in
its own schema and drops it. SQLite runs with ``synchronous=FULL`` (the store's default: an
append survives power loss) unless ``--sqlite-synchronous NORMAL``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from meshgate.audit.record import AuditRecord, Decision
from meshgate.audit.sqlbase import SqlAuditStore
from meshgate.audit.store import AuditQuery

DEFAULT_PG = "postgresql://meshgate:meshgate@127.0.0.1:5432/meshgate_test"
START = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
SPAN = dt.timedelta(days=30)
AGENTS = [f"agent-{i:02d}" for i in range(50)]
DESTS = [f"dest-{i:03d}" for i in range(100)]


def decision_for(rng: random.Random) -> tuple[Decision, int, str]:
    x = rng.random()
    if x < 0.10:
        return "denied", 403, "not_allowlisted"
    if x < 0.12:
        return "rate_limited", 429, "rate_limited"
    if x < 0.13:
        return "upstream_error", 503, "upstream_connect_error"
    return "allowed", 200, ""


def batches(total: int, size: int, seed: int = 7) -> Iterator[list[AuditRecord]]:
    rng = random.Random(seed)
    step = SPAN / total
    for first in range(0, total, size):
        out = []
        for i in range(first, min(first + size, total)):
            agent, dest = rng.choice(AGENTS), rng.choice(DESTS)
            decision, status, reason = decision_for(rng)
            out.append(
                AuditRecord(
                    timestamp=START + step * i + dt.timedelta(milliseconds=rng.randint(0, 500)),
                    request_id=f"{rng.getrandbits(128):032x}",  # random, like Envoy x-request-id
                    agent=agent,
                    spiffe_id=f"spiffe://mesh.local/agent/{agent}",
                    destination=dest,
                    host=f"{dest}.example.com",
                    method=rng.choice(("GET", "GET", "POST", "PUT")),
                    path=f"/v1/{rng.choice(('items', 'search', 'mcp'))}/{rng.randint(1, 9999)}",
                    status=status,
                    decision=decision,
                    reason=reason,
                    bytes_sent=rng.randint(0, 50_000),
                    bytes_received=rng.randint(0, 5_000),
                    duration_ms=round(rng.uniform(0.3, 900.0), 3),
                    policy_version="3f2a9c1",
                    gateway="gateway/main",
                )
            )
        yield out


def ingest(store: SqlAuditStore, total: int, size: int) -> tuple[float, float]:
    """(overall records/s, last-tenth records/s)."""
    spent = tail_spent = 0.0
    tail_records = 0
    done = 0
    for batch in batches(total, size):
        t0 = time.perf_counter()
        store.append(batch)
        took = time.perf_counter() - t0
        spent += took
        done += len(batch)
        if done > total * 0.9:
            tail_spent += took
            tail_records += len(batch)
    return total / spent, tail_records / tail_spent if tail_spent else 0.0


def latency(fn: Callable[[random.Random], object], runs: int) -> tuple[float, float]:
    rng = random.Random(11)
    fn(rng)  # warm the cache once, as a running control plane would be
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(rng)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def window(rng: random.Random, hours: int) -> tuple[dt.datetime, dt.datetime]:
    start = START + (SPAN - dt.timedelta(hours=hours)) * rng.random()
    return start, start + dt.timedelta(hours=hours)


def run_queries(store: SqlAuditStore, runs: int) -> list[tuple[str, float, float]]:
    def agent_time(rng: random.Random) -> object:
        since, until = window(rng, 1)
        return store.query(AuditQuery(agent=rng.choice(AGENTS), since=since, until=until))

    def denied(rng: random.Random) -> object:
        return store.query(AuditQuery(decision="denied"))

    def denied_day(rng: random.Random) -> object:
        since, until = window(rng, 24)
        return store.query(AuditQuery(decision="denied", since=since, until=until))

    def summary_day(rng: random.Random) -> object:
        return store.summary(*window(rng, 24))

    cases = [
        ("agent+time (1 h)", agent_time),
        ("decision=denied", denied),
        ("decision=denied, 24 h", denied_day),
        ("summary 24 h", summary_day),
    ]
    return [
        (name, *latency(fn, runs if "summary" not in name else max(runs // 10, 5)))
        for name, fn in cases
    ]


def bench(name: str, store: SqlAuditStore, args: argparse.Namespace) -> None:
    print(f"\n== {name}: {args.records:,} records in batches of {args.batch}", flush=True)
    overall, sustained = ingest(store, args.records, args.batch)
    target = " (target >= 20,000: " + ("PASS)" if overall >= 20_000 else "MISS)")
    print(
        f"ingest: {overall:,.0f} records/s overall, {sustained:,.0f} records/s in the last "
        f"tenth{target if name == 'sqlite' else ''}",
        flush=True,
    )
    for label, p50, p95 in run_queries(store, args.queries):
        verdict = "" if label.startswith("summary") else ("  PASS" if p95 < 50 else "  MISS")
        print(f"query {label:<22} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms{verdict}", flush=True)
    t0 = time.perf_counter()
    report = store.verify()
    print(
        f"verify: {report.records:,} records in {report.batches:,} batches, ok={report.ok}, "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    # what the AccessLogService commits at most per append (controlplane/access_log.py)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--sqlite-synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument(
        "--postgres", default=os.environ.get("MESHGATE_TEST_POSTGRES") or DEFAULT_PG
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores (shared)")
    for name in args.stores.split(","):
        if name == "sqlite":
            print(f"sqlite synchronous={args.sqlite_synchronous}")
            from meshgate.audit.sqlite_store import SqliteAuditStore

            with tempfile.TemporaryDirectory() as tmp:
                store = SqliteAuditStore(
                    Path(tmp) / "audit.db", synchronous=args.sqlite_synchronous
                )
                bench("sqlite", store, args)
                store.close()
                print(f"sqlite file: {(Path(tmp) / 'audit.db').stat().st_size / 2**20:,.0f} MiB")
        elif name == "postgres":
            import psycopg

            from meshgate.audit.postgres_store import PostgresAuditStore

            schema = f"bench_{os.getpid()}"
            pg_store = PostgresAuditStore(args.postgres, schema=schema)
            try:
                bench("postgres", pg_store, args)
            finally:
                pg_store.close()
                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        else:
            parser.error(f"unknown store {name!r}")


if __name__ == "__main__":
    main()
