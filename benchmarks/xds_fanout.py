"""xDS fan-out at fleet size: who gets a push, how fast, and at what memory.

The server process runs meshgate's own pieces: `build_snapshots` on a `PolicyModel` of N agents
(one rule each, 50 destinations, a certificate per agent), the `SnapshotCache`, the `AdsService`
with its push queue, over grpc.aio. Several client processes open N sidecar streams
(`agent/a00001/0`, ... one group each) and 3 gateway streams (`gateway/g1..3`), one connection
per stream as each Envoy has, subscribe as Envoy does (CDS and LDS wildcard, RDS and SDS by
name) and ACK every response at once. Then:

  (a) one-agent changes: an agent's rules (only the gateways' route table changes) and an
      agent's certificate (only its sidecar's SDS changes). Responses counted on the server
      must equal the sum over changed groups of streams x changed subscribed types.
  (b) a mesh-wide change (the gateway's port, which every sidecar's cluster names): all ACK.
  (c) the server's RSS with all streams connected.
  (d) a renewal wave: new certificates for W groups at once (SDS only), and, while it is
      pushed, one-agent certificate changes of unrelated agents; their push delay (change set
      in the cache -> ACK received) against the same changes without a wave.

    python benchmarks/xds_fanout.py            # 10,000 agents, 4 client processes
    python benchmarks/xds_fanout.py --small    # 500 agents, in < 30 s

Targets (2 cores, 10,000 agents): (a) all ACK < 100 ms; (b) < 3 s; (c) RSS < 1 GB.
Times are from the server's clock reading just before `set_snapshots` to the last client's
receipt of the new version (the ACK is queued at that instant); builds are reported apart,
as meshgate runs them off the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DESTINATIONS = 50
GATEWAYS = 3


def agent_name(i: int) -> str:
    return f"a{i:05d}"


def node_id(index: int) -> str:
    """Stream `index` of the fleet: the gateways first, then one sidecar per agent."""
    if index < GATEWAYS:
        return f"gateway/g{index + 1}"
    return f"agent/{agent_name(index - GATEWAYS + 1)}/0"


# -- server ------------------------------------------------------------------------------------


class Fleet:
    """The policy and certificates being served, and how to change them."""

    def __init__(self, agents: int) -> None:
        from meshgate.policy.model import AgentPolicy, Destination, EgressRule, Mesh

        self.dests = tuple(
            Destination(
                f"tool-{i:03d}",
                f"tool-{i:03d}.internal",
                80,
                tls="none",
                address=("127.0.0.1", 10000 + i),
            )
            for i in range(DESTINATIONS)
        )
        self.names = [agent_name(i) for i in range(1, agents + 1)]
        self.rules = {
            n: (EgressRule(self.dests[i % DESTINATIONS].name),) for i, n in enumerate(self.names)
        }
        self.mesh = Mesh(gateway_listen_port=15001)
        self.serials: dict[str, int] = {}
        self.version = 0
        self._agent_policy = AgentPolicy
        self._rule = EgressRule
        self._identities: dict[str, tuple[int, Any]] = {}
        self._policies: dict[str, Any] = {}

    def identity(self, who: str) -> Any:
        """The current certificate of a node group: the same object until it is renewed, as
        meshgate's issuer keeps it."""
        from meshgate.xds.mtls import NodeIdentity

        serial = self.serials.get(who, 0)
        cached = self._identities.get(who)
        if cached is None or cached[0] != serial:
            pem = f"-----BEGIN CERTIFICATE-----\n{who} serial {serial}\n".encode() * 8
            ident = NodeIdentity(f"spiffe://agents.local/{who}", pem, b"k" * 240, b"t" * 600)
            cached = self._identities[who] = (serial, ident)
        return cached[1]

    def build(self) -> dict[str, Any]:
        """A whole build, as meshgate's control plane makes it; agent policies are reused
        while their rules are unchanged, as policy compilation reuses unchanged documents'."""
        from meshgate.policy.model import PolicyModel
        from meshgate.xds.build import Identities, build_snapshots

        agents = []
        for n in self.names:
            pol = self._policies.get(n)
            if pol is None or pol.rules is not self.rules[n]:
                pol = self._policies[n] = self._agent_policy(n, n, self.rules[n])
            agents.append(pol)
        model = PolicyModel(self.mesh, self.dests, tuple(agents), f"v{self.version}")
        ids = Identities(self.identity("gateway"), {n: self.identity(n) for n in self.names})
        return build_snapshots(model, identities=ids)

    def change_rules(self, name: str) -> None:
        self.version += 1  # a policy change; renewals keep the policy version, as meshgate does
        extra = self.dests[(self.version * 7) % DESTINATIONS].name
        self.rules[name] = (*self.rules[name][:1], self._rule(extra, paths=(f"/v{self.version}",)))

    def renew(self, names: list[str]) -> None:
        for n in names:
            self.serials[n] = self.serials.get(n, 0) + 1

    def move_gateway(self) -> None:
        self.version += 1
        self.mesh = dataclasses.replace(
            self.mesh, gateway_listen_port=self.mesh.gateway_listen_port + 1
        )


class Server:
    def __init__(self, agents: int, max_pushes: int) -> None:
        from meshgate.controlplane.ads import AdsService
        from meshgate.controlplane.cache import SnapshotCache
        from meshgate.controlplane.registry import NodeRegistry

        self.fleet = Fleet(agents)
        self.cache, self.registry = SnapshotCache(), NodeRegistry()
        self.ads = AdsService(self.cache, self.registry, max_concurrent_pushes=max_pushes)
        t0 = time.perf_counter()
        self.cache.set_snapshots(self.fleet.build())
        self.cold_build_s = time.perf_counter() - t0
        self.gc_pauses = [0, 0.0, 0.0]  # full collections, their total and longest seconds
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        self.gc_pauses = [
            self.gc_pauses[0] + 1,
            self.gc_pauses[1] + took,
            max(self.gc_pauses[2], took),
        ]

    def apply(self, snapshots: dict[str, Any]) -> dict[str, Any]:
        """Hand new snapshots to the cache; say which versions each stream should now get
        (worked out first, so that the bookkeeping does not delay the pushes)."""
        expected: collections.Counter[str] = collections.Counter()
        groups = 0
        by_group = self.streams_by_group()
        for group, new in snapshots.items():
            old = self.cache.get(group)
            changed = new.changed_types(old)
            if changed:
                groups += 1
            for subscribed in by_group.get(group, ()):
                expected.update(new.version(t) for t in changed if t in subscribed)
        t_set, cpu_set = time.time(), time.process_time()
        self.cache.set_snapshots(snapshots)
        return {"t_set": t_set, "cpu_set": cpu_set, "groups": groups, "expected": dict(expected)}

    def streams_by_group(self) -> dict[str, list[set[str]]]:
        out: dict[str, list[set[str]]] = {}
        for conn in self.registry.connections():
            out.setdefault(conn.role.group, []).append(set(conn.types))
        return out

    async def build(self) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        snapshots = await asyncio.to_thread(self.fleet.build)
        return snapshots, time.perf_counter() - t0

    async def command(self, words: list[str]) -> Any:
        cmd = words[0]
        if cmd == "cpu":
            return {"cpu": time.process_time()}
        if cmd == "streams":
            return {"streams": len(self.registry), "cold_build_s": self.cold_build_s}
        if cmd == "mem":
            return {**memory(os.getpid()), "objects": len(gc.get_objects())}
        if cmd == "sent":
            from meshgate.xds import types

            sent = self.ads.sent
            return {types.SHORT_NAMES[t]: n for t, n in sent.items()}
        if cmd == "gc":
            return {
                "collections": self.gc_pauses[0],
                "total_s": self.gc_pauses[1],
                "max_s": self.gc_pauses[2],
            }
        if cmd == "profile":
            import cProfile
            import pstats

            # a profiler to attach instead (-p PID is added), stopped by SIGINT: e.g.
            # FANOUT_ATTACH="py-spy record --native --threads -f raw -o spy.txt"
            spy = os.environ.get("FANOUT_ATTACH")
            if words[1] == "start":
                if spy:
                    self.spy = subprocess.Popen(
                        [*shlex.split(spy), "-p", str(os.getpid())], stdout=sys.stderr
                    )
                    time.sleep(1.0)  # let it attach
                else:
                    self.profiler = cProfile.Profile()
                    self.profiler.enable()
            elif spy:
                import signal

                self.spy.send_signal(signal.SIGINT)
                self.spy.wait(60)
            else:
                self.profiler.disable()
                pstats.Stats(self.profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            return {}
        if cmd == "pusher":
            p = self.ads.pusher
            return {"max_in_flight": p.max_in_flight, "limit": p.limit, "pushes": p.pushes}
        if cmd in ("rules", "cert", "wide"):
            if cmd == "rules":
                self.fleet.change_rules(agent_name(int(words[1])))
            elif cmd == "cert":
                self.fleet.renew([agent_name(int(words[1]))])
            else:
                self.fleet.move_gateway()
            snapshots, build_s = await self.build()
            return {**self.apply(snapshots), "build_s": build_s}
        if cmd == "wave":
            return await self.wave(int(words[1]), int(words[2]), float(words[3]))
        raise ValueError(cmd)

    async def wave(self, size: int, probes: int, spacing: float) -> dict[str, Any]:
        """Renew `size` groups' certificates at once; then, `spacing` s apart while that is
        pushed, renew one unrelated agent's at a time, each built (in a thread) and set as
        meshgate does, so builds and pushes share the cores as they would."""
        names = self.fleet.names
        self.fleet.renew(names[:size])
        wave, _ = await self.build()
        first = self.apply(wave)
        del wave
        out = []
        for k in range(probes):
            await asyncio.sleep(spacing)
            self.fleet.renew([names[-1 - k]])  # unrelated: never in the wave
            snapshots, _ = await self.build()
            out.append(self.apply(snapshots))
        return {"wave": first, "probes": out}


async def run_server(agents: int, max_pushes: int, gc_mode: str) -> None:
    import logging

    import grpc

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)  # cancelled at exit
    from meshgate.controlplane.ads import SERVER_OPTIONS

    server_state = Server(agents, max_pushes)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((server_state.ads.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if gc_mode == "tuned":  # as `meshgate serve` does once started
        from meshgate.controlplane.collector import tune_collector

        tune_collector()
    print(f"port {port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        print(json.dumps(await server_state.command(line.split())), flush=True)
    await server.stop(0)


def memory(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


# -- clients -----------------------------------------------------------------------------------


async def run_clients(address: str, first: int, count: int) -> None:
    """Streams `first` .. `first + count - 1` of the fleet, each on its own connection."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from meshgate.xds import types
    from meshgate.xds.gateway import ROUTE_NAME
    from meshgate.xds.mtls import IDENTITY_SECRET, TRUST_SECRET
    from meshgate.xds.sidecar import route_name

    seen: dict[str, list[float]] = {}  # version -> [responses, last receipt time]
    ready = 0
    all_ready = asyncio.Event()
    secrets = [IDENTITY_SECRET, TRUST_SECRET]

    async def stream(index: int) -> None:
        nonlocal ready
        nid = node_id(index)
        route = ROUTE_NAME if nid.startswith("gateway/") else route_name(nid.split("/")[1])
        subs = {types.CLUSTER: [], types.LISTENER: [], types.ROUTE: [route], types.SECRET: secrets}
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while True:
                yield await queue.get()

        node = base_pb2.Node(id=nid)
        for type_url, names in subs.items():
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, resource_names=names)
            )
        initial = set(subs)
        async for resp in stub.StreamAggregatedResources(requests()):
            queue.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=subs[resp.type_url],
                )
            )
            entry = seen.setdefault(resp.version_info, [0, 0.0])
            entry[0] += 1
            entry[1] = time.time()
            if initial:
                initial.discard(resp.type_url)
                if not initial:
                    ready += 1
                    if ready == count:
                        all_ready.set()

    async def guarded(index: int) -> None:
        try:
            await stream(index)
        except Exception as exc:
            print(f"stream {node_id(index)} failed: {repr(exc)[:300]}", file=sys.stderr, flush=True)

    tasks = []
    for k in range(count):  # connect in waves, as a fleet does, not all in one instant
        tasks.append(asyncio.create_task(guarded(first + k)))
        if k % 200 == 199:
            await asyncio.sleep(0.05)
    await all_ready.wait()
    # The clients stand in for 10,000 Envoys: their own collector pauses (thousands of
    # channels) must not be charged to the server, so their long-lived objects are frozen.
    gc.freeze()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        versions = line.split()[1:]
        print(json.dumps({v: seen.get(v, [0, 0.0]) for v in versions}), flush=True)
    os._exit(0)  # skip the slow teardown of thousands of streams


# -- driver ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, agents: int, client_procs: int, max_pushes: int, gc_mode: str) -> None:
        py, me = sys.executable, str(Path(__file__).resolve())
        self.agents = agents
        self.server = subprocess.Popen(
            [
                *(py, me, "--role", "server", "--agents", str(agents)),
                *("--max-pushes", str(max_pushes), "--gc", gc_mode),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        port = int(self.server.stdout.readline().split()[1])
        total = agents + GATEWAYS
        per = [
            total // client_procs + (1 if i < total % client_procs else 0)
            for i in range(client_procs)
        ]
        self.clients = []
        first = 0
        t0 = time.time()
        for count in per:
            self.clients.append(
                subprocess.Popen(
                    [
                        py,
                        me,
                        "--role",
                        "clients",
                        "--address",
                        f"127.0.0.1:{port}",
                        "--first",
                        str(first),
                        "--count",
                        str(count),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            first += count
        for c in self.clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        self.connect_s = time.time() - t0

    def ask(self, command: str) -> Any:
        assert self.server.stdin and self.server.stdout
        self.server.stdin.write(command + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def receipts(self, versions: list[str]) -> dict[str, list[float]]:
        """Per version: responses received over all client processes, and the last receipt."""
        for c in self.clients:
            assert c.stdin is not None
            c.stdin.write("q " + " ".join(versions) + "\n")
            c.stdin.flush()
        total = {v: [0, 0.0] for v in versions}
        for c in self.clients:
            assert c.stdout is not None
            for v, (n, t) in json.loads(c.stdout.readline()).items():
                total[v][0] += n
                total[v][1] = max(total[v][1], t)
        return total

    def wait(self, change: dict[str, Any], timeout: float = 60.0) -> float:
        """Seconds from the change to the last expected receipt, once every one arrived."""
        expected = change["expected"]
        if not expected:
            return 0.0
        deadline = time.time() + timeout
        while True:
            got = self.receipts(list(expected))
            if all(got[v][0] >= n for v, n in expected.items()):
                return max(got[v][1] for v in expected) - change["t_set"]
            if time.time() > deadline:
                missing = {v: (n, got[v][0]) for v, n in expected.items() if got[v][0] < n}
                raise TimeoutError(f"not every stream got its push: {missing}")
            time.sleep(0.05)

    def change(self, command: str) -> dict[str, Any]:
        before, gc_before = self.ask("sent"), self.ask("gc")
        clients_before = self.client_cpu()
        change = self.ask(command)
        ack_s = self.wait(change)
        # CPU seconds from the change being set until all ACKed (the build, in a thread, ended
        # before), for the server, and for the client processes from just before the change
        server_cpu = self.ask("cpu")["cpu"] - change["cpu_set"]
        clients_cpu = self.client_cpu() - clients_before
        gc_after = self.ask("gc")
        time.sleep(0.2)  # anything beyond the expected would have been sent by now
        after = self.ask("sent")
        sent = {t: after.get(t, 0) - before.get(t, 0) for t in after}
        return {
            "ack_s": ack_s,
            "server_cpu_s": server_cpu,
            "clients_cpu_s": clients_cpu,
            "build_s": change["build_s"],
            "groups_changed": change["groups"],
            "expected": sum(change["expected"].values()),
            "sent": {t: n for t, n in sent.items() if n},
            # full collections from the change until all ACKed, and their total pause
            "full_gcs": gc_after["collections"] - gc_before["collections"],
            "gc_s": gc_after["total_s"] - gc_before["total_s"],
        }

    def client_cpu(self) -> float:
        """User + system CPU seconds of the client processes so far."""
        total = 0
        for c in self.clients:
            with open(f"/proc/{c.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for p in (*self.clients, self.server):
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        for p in (*self.clients, self.server):
            p.wait(30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.agents, args.client_procs, args.max_pushes, args.gc)
    try:
        streams = bench.ask("streams")
        out: dict[str, Any] = {
            "gc_connect": bench.ask("gc"),
            "agents": args.agents,
            "streams": streams["streams"],
            "connect_s": bench.connect_s,
            "cold_build_s": streams["cold_build_s"],
            "memory_connected_mb": bench.ask("mem"),
        }
        step = max(1, args.agents // args.repeat)
        steps = args.steps.split(",")
        if args.profile:
            bench.ask("profile start")
        if "rules" in steps:
            out["rules"] = [bench.change(f"rules {1 + k * step}") for k in range(args.repeat)]
        if "cert" in steps:
            out["cert"] = [bench.change(f"cert {2 + k * step}") for k in range(args.repeat)]
        if "wide" in steps:
            out["wide"] = [bench.change("wide") for _ in range(max(1, args.repeat // 2))]
        if "wave" in steps:
            before = bench.ask("sent")
            wave = bench.ask(f"wave {args.wave} {args.probes} {args.probe_spacing}")
            out["wave"] = {
                "groups": args.wave,
                "ack_s": bench.wait(wave["wave"]),
                "expected": sum(wave["wave"]["expected"].values())
                + sum(sum(p["expected"].values()) for p in wave["probes"]),
                "probe_delays_s": [bench.wait(p) for p in wave["probes"]],
                "probes_started_s": [p["t_set"] - wave["wave"]["t_set"] for p in wave["probes"]],
            }
            time.sleep(0.2)
            after = bench.ask("sent")
            out["wave"]["sent"] = sum(after.values()) - sum(before.values())
        if args.profile:
            bench.ask("profile stop")
        out["gc"] = bench.ask("gc")
        out["pusher"] = bench.ask("pusher")
        out["memory_end_mb"] = bench.ask("mem")
        return out
    finally:
        bench.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(r: dict[str, Any]) -> None:
    ms = 1000
    print(
        f"agents {r['agents']:,}, streams {r['streams']:,} (sidecars + {GATEWAYS} gateways), "
        f"connected in {r['connect_s']:.1f} s; cold build {r['cold_build_s']:.2f} s"
    )
    for key, what in (
        ("rules", "one agent's rules"),
        ("cert", "one agent's certificate"),
        ("wide", "mesh-wide (gateway port)"),
    ):
        if key not in r:
            continue
        rows = r[key]
        acks = [x["ack_s"] for x in rows]
        sent = rows[-1]["sent"]
        exact = all(sum(x["sent"].values()) == x["expected"] for x in rows)
        print(
            f"{what:>26}: groups woken {rows[-1]['groups_changed']:>6,}, responses sent "
            f"{sum(sent.values()):>6,} {sent} expected {rows[-1]['expected']:,} "
            f"({'exact' if exact else 'MISMATCH'} in {len(rows)} runs); all ACK median "
            f"{statistics.median(acks) * ms:.1f} ms, max {max(acks) * ms:.1f} ms; "
            f"build {statistics.median(x['build_s'] for x in rows) * ms:.0f} ms; CPU until all "
            f"ACK: server {statistics.median(x['server_cpu_s'] for x in rows) * ms:.0f} ms, "
            f"clients {statistics.median(x['clients_cpu_s'] for x in rows) * ms:.0f} ms; full GCs "
            f"{sum(x['full_gcs'] for x in rows)} ({sum(x['gc_s'] for x in rows) * ms:.0f} ms)"
        )
    if "wave" in r:
        w = r["wave"]
        base = [x["ack_s"] for x in r.get("cert", [])] or [float("nan")]
        during = [
            d
            for d, t in zip(w["probe_delays_s"], w["probes_started_s"], strict=True)
            if t < w["ack_s"]
        ]
        n_during = len(during)
        during = during or [float("nan")]
        delays = w["probe_delays_s"]
        print(
            f"{'renewal wave':>26}: {w['groups']:,} groups' SDS all ACK in "
            f"{w['ack_s'] * ms:.0f} ms; responses {w['sent']:,} (expected {w['expected']:,})"
        )
        print(
            f"{'one-agent cert changes':>26}: {len(delays)} from the wave on, {n_during} "
            f"set while it was pushed: push delay p50 {pct(during, 0.5) * ms:.1f} ms, "
            f"p99 {pct(during, 0.99) * ms:.1f} ms; all {len(delays)}: p99 "
            f"{pct(delays, 0.99) * ms:.1f} ms (without a wave: p50 {pct(base, 0.5) * ms:.1f} ms, "
            f"p99 {pct(base, 0.99) * ms:.1f} ms)"
        )
    print(f"{'pusher':>26}: {r['pusher']}")
    g, g0 = r["gc"], r["gc_connect"]
    print(
        f"{'server full GCs':>26}: {g['collections']} ({g0['collections']} while connecting), "
        f"total {g['total_s']:.2f} s, longest {g['max_s'] * ms:.0f} ms"
    )
    m1, m2 = r["memory_connected_mb"], r["memory_end_mb"]
    print(
        f"{'server memory':>26}: RSS connected {m1['VmRSS']:.0f} MB, at end {m2['VmRSS']:.0f} MB, "
        f"peak {m2['VmHWM']:.0f} MB; {m1['objects']:,} objects tracked by the collector"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--role", choices=["bench", "server", "clients"], default="bench")
    ap.add_argument("--small", action="store_true", help="500 agents, 2 client processes")
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--max-pushes", type=int, default=100, help="the push queue's bound")
    ap.add_argument(
        "--gc",
        choices=["tuned", "default"],
        default="tuned",
        help="the server's collector: as meshgate serve sets it, or CPython's defaults",
    )
    ap.add_argument("--repeat", type=int, default=5, help="one-agent changes of each kind")
    ap.add_argument("--wave", type=int, default=1000, help="groups renewed at once")
    ap.add_argument("--probes", type=int, default=20, help="one-agent changes during the wave")
    ap.add_argument("--probe-spacing", type=float, default=0.0, help="seconds between them")
    ap.add_argument("--steps", default="rules,cert,wide,wave", help="which changes to make")
    ap.add_argument("--profile", action="store_true", help="cProfile the server (to stderr)")
    ap.add_argument("--address", default="")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(run_server(args.agents, args.max_pushes, args.gc))
        return
    if args.role == "clients":
        asyncio.run(run_clients(args.address, args.first, args.count))
        return
    if args.small:
        args.agents, args.client_procs, args.wave, args.probes = 500, 2, 100, 10
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
