"""xDS fan-out: how fast one policy change reaches N connected ADS clients.

The server (meshgate's real AdsService and SnapshotCache) runs in its own process; N simulated
clients open real gRPC SotW streams from separate processes, subscribe to clusters and listeners,
and ACK what they get, as Envoy does. One policy change is then made; we report the time until
every client has ACKed the new version, the server's CPU seconds for that change and its peak RSS.

    python benchmarks/xds_fanout.py                 # N = 100, 1000, 5000
    python benchmarks/xds_fanout.py --clients 1000  # one size

Targets (2 cores): 1,000 clients converge in < 1 s; 5,000 in < 5 s with server RSS < 500 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DESTINATIONS = 50


def bench_model(version: str, port: int):  # type: ignore[no-untyped-def]
    from meshgate.policy.model import AgentPolicy, Destination, EgressRule, Mesh, PolicyModel

    dests = tuple(
        Destination(
            f"tool-{i:03d}",
            f"tool-{i:03d}.internal",
            80,
            tls="none",
            address=("127.0.0.1", 10000 + i),
        )
        for i in range(DESTINATIONS)
    )
    agents = (AgentPolicy("a", "a", (EgressRule(dests[0].name),)),)
    return PolicyModel(Mesh(gateway_listen_port=port), dests, agents, version)


async def run_server() -> None:
    import logging

    import grpc

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from meshgate.controlplane.ads import SERVER_OPTIONS, AdsService
    from meshgate.controlplane.cache import SnapshotCache
    from meshgate.controlplane.registry import NodeRegistry
    from meshgate.xds.build import build_snapshots

    cache, registry = SnapshotCache(), NodeRegistry()
    cache.set_snapshots(build_snapshots(bench_model("v1", 15001)))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((AdsService(cache, registry).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "change":
            proc = psutil.Process()
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.time()
            cache.set_snapshots(build_snapshots(bench_model("v2", 15002)))
            print(f"changed {t0} {cpu0}", flush=True)
        elif line == "cpu":
            print(f"cpu {sum(psutil.Process().cpu_times()[:2])}", flush=True)
        elif line == "streams":
            print(f"streams {len(registry)}", flush=True)
    await server.stop(0)


async def run_clients(address: str, count: int, offset: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from meshgate.xds import types

    ready = asyncio.Event()
    ready_count = 0
    acked_at: list[float] = []
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)  # one connection per client, as each Envoy has
    ]

    errors: list[str] = []

    async def client(i: int) -> None:
        try:
            await stream(i)
        except Exception as exc:
            errors.append(repr(exc)[:300])
            print(f"client {i} failed: {repr(exc)[:300]}", file=sys.stderr, flush=True)

    async def stream(i: int) -> None:
        nonlocal ready_count
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[i % len(channels)])
        node = base_pb2.Node(id=f"gateway/bench-{offset + i}")
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while True:
                yield await queue.get()

        call = stub.StreamAggregatedResources(requests())
        for t in (types.CLUSTER, types.LISTENER):
            queue.put_nowait(discovery_pb2.DiscoveryRequest(node=node, type_url=t))
        got_v1: set[str] = set()
        got_v2: set[str] = set()
        async for resp in call:
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                )
            )
            if resp.version_info.startswith("v1-"):
                got_v1.add(resp.type_url)
                if len(got_v1) == 2:
                    ready_count += 1
                    if ready_count == count:
                        ready.set()
            else:
                got_v2.add(resp.type_url)
                if len(got_v2) == 2:
                    acked_at.append(time.time())
                    return

    tasks = []
    for i in range(count):  # connect in waves, as a fleet does, not all in one instant
        tasks.append(asyncio.create_task(client(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    await ready.wait()
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    print(f"done {max(acked_at)}", flush=True)
    os._exit(0)  # skip slow teardown of thousands of streams


def measure(n: int, client_procs: int) -> dict[str, float]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    server = subprocess.Popen(
        [py, me, "--role", "server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin and server.stdout
    port = int(server.stdout.readline().split()[1])
    per = [n // client_procs + (1 if i < n % client_procs else 0) for i in range(client_procs)]
    clients = []
    offset = 0
    for k in per:
        clients.append(
            subprocess.Popen(
                [
                    py,
                    me,
                    "--role",
                    "clients",
                    "--address",
                    f"127.0.0.1:{port}",
                    "--clients",
                    str(k),
                    "--offset",
                    str(offset),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        offset += k
    for c in clients:
        assert c.stdout and c.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    server.stdin.write("change\n")
    server.stdin.flush()
    _, t0, cpu0 = server.stdout.readline().split()
    done = []
    for c in clients:
        assert c.stdout
        done.append(float(c.stdout.readline().split()[1]))
        c.wait()
    server.stdin.write("cpu\n")
    server.stdin.flush()
    cpu1 = float(server.stdout.readline().split()[1])
    with open(f"/proc/{server.pid}/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    server.stdin.write("\n")
    server.stdin.flush()
    server.wait(10)
    return {
        "clients": n,
        "converge_s": max(done) - float(t0),
        "server_cpu_s": cpu1 - float(cpu0),
        "server_peak_rss_mb": hwm / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["bench", "server", "clients"], default="bench")
    ap.add_argument("--clients", type=int, action="append")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--address", default="")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(run_server())
        return
    if args.role == "clients":
        asyncio.run(run_clients(args.address, args.clients[0], args.offset))
        return
    sizes = args.clients or [100, 1000, 5000]
    rows = [measure(n, min(args.client_procs, n)) for n in sizes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'clients':>8} {'converge s':>11} {'server CPU s':>13} {'peak RSS MB':>12}")
    for r in rows:
        print(
            f"{r['clients']:>8} {r['converge_s']:>11.3f} {r['server_cpu_s']:>13.3f} "
            f"{r['server_peak_rss_mb']:>12.1f}"
        )
    print("targets: 1000 < 1 s, 5000 < 5 s, RSS < 500 MB")


if __name__ == "__main__":
    main()
