"""Limit store decisions per second per core: MemoryStore, RedisStore and RemoteStore.

What: for each store, ``--ops`` rate-limit decisions (``hit`` on one of 100 buckets) and
``--ops`` budget decisions (``reserve`` of two budgets, then ``settle``), issued by
``--concurrency`` asyncio workers on one event loop. Reported per operation:

* client CPU/op     -- this process's CPU time (user + system) per decision: the cost a gateway
                       pays per request, and its inverse, decisions/s per client core;
* server CPU/op     -- the store server's CPU per decision: redis-server for RedisStore, the
                       control plane's gRPC service (a MemoryStore, in a process of its own)
                       for RemoteStore;
* wall ops/s        -- decisions per wall-clock second (noisy on a shared machine).

CPU time is the figure to compare; wall-clock numbers on a loaded
machine say little. Ratios within one run are the robust figures.

Why: issue 19 asks for "limiter decisions/s per core"; the gateway's pacer calls the store
once per globally limited request and twice (reserve, settle) per budgeted one.

Usage::

    .venv/bin/python benchmarks/limit_store.py [--ops 20000] [--concurrency 32] \\
        [--stores memory,redis,remote] [--redis-url redis://127.0.0.1:6379/0]

Without ``--redis-url`` it starts its own ``redis-server`` (no persistence) on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import psutil

from meshgate.pacing.memory_store import MemoryStore
from meshgate.pacing.redis_store import RedisStore
from meshgate.pacing.remote_store import CHANNEL_OPTIONS, RemoteStore
from meshgate.pacing.store import Charge, LimitStore, StoreUnavailable
from meshgate.pacing.store_service import store_service_handler

TIMEOUT_S = 1.0  # generous: this measures cost, not the failure path


@dataclass
class Result:
    store: str
    op: str
    ops: int
    failed: int
    client_cpu_s: float
    redis_cpu_s: float | None
    wall_s: float

    def row(self) -> str:
        client_us = self.client_cpu_s / self.ops * 1e6
        redis = (
            f"{self.redis_cpu_s / self.ops * 1e6:8.1f} us"
            if self.redis_cpu_s is not None
            else "       -   "
        )
        per_core = self.ops / self.client_cpu_s
        return (
            f"{self.store:<8} {self.op:<16} {client_us:8.1f} us {per_core:10,.0f}"
            f"   {redis} {self.ops / self.wall_s:10,.0f} {self.failed:7d}"
        )


async def run(
    store: LimitStore,
    name: str,
    op: str,
    call: Callable[[int], Awaitable[None]],
    ops: int,
    concurrency: int,
    redis_proc: psutil.Process | None,
) -> Result:
    failed = 0
    counter = iter(range(ops))
    why: dict[str, int] = {}

    async def worker() -> None:
        nonlocal failed
        for i in counter:
            try:
                await call(i)
            except StoreUnavailable as e:
                failed += 1
                reason = str(e).split(": ", 1)[-1][:60]
                why[reason] = why.get(reason, 0) + 1
                await asyncio.sleep(0.001)  # a refusal does not suspend: let the others run

    for i in range(min(ops, 200)):  # warm up: connections, scripts, caches
        await call(i + 10**9)
    me = psutil.Process()
    cpu0 = _cpu(me)
    redis0 = _cpu(redis_proc) if redis_proc else 0.0
    wall0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu = _cpu(me) - cpu0
    redis_cpu = _cpu(redis_proc) - redis0 if redis_proc else None
    for reason, count in sorted(why.items(), key=lambda kv: -kv[1]):
        print(f"# {name} {op}: {count} failed: {reason}", file=sys.stderr)
    return Result(name, op, ops, failed, cpu, redis_cpu, wall)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def bench(
    name: str, store: LimitStore, args: argparse.Namespace, redis_proc: psutil.Process | None
) -> list[Result]:
    run_id = uuid.uuid4().hex[:8]
    now = int(time.time())
    window = (now - now % 86_400, now - now % 86_400 + 86_400)

    async def hit(i: int) -> None:
        await store.hit(f"bench/{run_id}/{i % 100}", 1_000_000_000, 1)

    async def reserve_settle(i: int) -> None:
        rid = f"{run_id}-{i}"
        charges = [
            Charge(f"agent/{i % 50}/daily", 10**15, 100, *window),
            Charge(f"group/{i % 5}/daily", 10**15, 100, *window),
        ]
        answer = await store.reserve(rid, charges, 60)
        assert answer.admitted
        await store.settle(rid, {charges[0].budget: 42})

    results = [
        await run(store, name, "hit", hit, args.ops, args.concurrency, redis_proc),
        await run(
            store, name, "reserve+settle", reserve_settle, args.ops, args.concurrency, redis_proc
        ),
    ]
    # a reserve+settle pair is two decisions of the store, one admission decision
    return results


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server), or give --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


async def amain(args: argparse.Namespace) -> None:
    stores = args.stores.split(",")
    results: list[Result] = []
    if "memory" in stores:
        results += await bench("memory", MemoryStore(), args, None)
    if "redis" in stores:
        proc = None
        url = args.redis_url
        if url is None:
            proc, url = start_redis()
        try:
            redis_ps = psutil.Process(proc.pid) if proc else None
            store = RedisStore(url, timeout_s=TIMEOUT_S, max_in_flight=max(args.concurrency, 1))
            try:
                results += await bench("redis", store, args, redis_ps)
            finally:
                await store.close()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    if "remote" in stores:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-remote"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
            remote = RemoteStore(channel, timeout_s=TIMEOUT_S, max_in_flight=args.concurrency)
            try:
                results += await bench("remote", remote, args, psutil.Process(server.pid))
            finally:
                await channel.close()
        finally:
            server.terminate()
            server.wait(10)
    print(
        f"# {args.ops} ops per row, {args.concurrency} concurrent callers, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'store':<8} {'operation':<16} {'client CPU/op':>11} {'ops/s/core':>10}"
        f"   {'server CPU/op':>11} {'wall ops/s':>10} {'failed':>7}"
    )
    for r in results:
        print(r.row())


async def serve_remote() -> None:
    """The control plane's side of RemoteStore, in a process of its own: a MemoryStore."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((store_service_handler(MemoryStore()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stores", default="memory,redis,remote")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--serve-remote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(serve_remote() if args.serve_remote else amain(args))


if __name__ == "__main__":
    main()
