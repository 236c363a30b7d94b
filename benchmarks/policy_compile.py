"""Policy compile time at scale: a whole policy repository, and one agent's rule change.

What: generate a policy repository in meshgate's YAML language in a temporary directory (one
Mesh, ``--destinations`` Destinations, ``--agents`` AgentPolicies with ``--rules`` egress rules
each, a mix of methods, paths, headers, MCP tools and rate limits) and time, as the best and the
median of ``--repeat`` runs:

* read      -- ``read_policy_files``: walk the directory and read every file;
* load      -- ``load_policy_texts``: parse, validate and compile into a ``PolicyModel``;
* build     -- ``build_snapshots``: translate the model into Envoy resources, serialised;
* total     -- the three together: what a control plane does on start-up.

Then one agent's rule is changed (its first ``rateLimit.requests`` is edited in the in-memory
``{path: text}`` mapping, as a git pull or file watcher would deliver it) and we time producing
the new snapshots: ``load_policy_texts`` on the changed texts plus ``build_snapshots``, and the
``build_snapshots`` part alone. The number of Envoy resources and the serialised size of the
gateway snapshot (sum of each resource's packed ``Any``) are printed too, with how many resources
the change actually altered.

Why: the issue asks for "1,000 agents x 50 destinations x 5 rules: load+validate+compile time,
and time to produce the new snapshot after one agent's rule changes. Target: full compile under
2 s, a one-agent change under 100 ms." PASS/MISS is judged on the median. The garbage collector
stays on (a control plane runs with it on); a full collection is made before each timed run.

Layout of the generated repository: ``mesh.yaml``, ``destinations.yaml`` (all destinations, one
document each) and ``agents/agents-NNNN.yaml`` holding ``--agents-per-file`` AgentPolicies each
(default 1: one file per agent, the layout that lets a change touch one small file).

Usage::

    .venv/bin/python benchmarks/policy_compile.py
    .venv/bin/python benchmarks/policy_compile.py --agents 1000 --destinations 50 --rules 5 \\
        --repeat 3 [--agents-per-file 1] [--json] [--profile 25]

``--profile N`` also runs the one-agent change once under cProfile and prints the top N
functions by own time and by cumulative time. Exit status is 0 even when a target is missed:
this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import platform
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meshgate.errors import PolicyError  # noqa: E402
from meshgate.policy.loader import (  # noqa: E402
    clear_policy_cache,
    load_policy_texts,
    read_policy_files,
)
from meshgate.policy.model import PolicyModel  # noqa: E402
from meshgate.xds.build import build_snapshots, clear_translation_caches  # noqa: E402
from meshgate.xds.nodes import GATEWAY_GROUP  # noqa: E402
from meshgate.xds.snapshot import Snapshot  # noqa: E402

FULL_TARGET_S = 2.0
CHANGE_TARGET_S = 0.100
HEADER = "apiVersion: meshgate.dev/v1\n"
_REQUESTS = re.compile(r"requests: (\d+)")


# --------------------------------------------------------------------------- policy generation


def _dest_name(i: int) -> str:
    return f"tool-{i:03d}"


def mesh_yaml() -> str:
    return (
        HEADER + "kind: Mesh\n"
        "metadata: {name: default}\n"
        "spec:\n"
        "  trustDomain: agents.bench\n"
        "  egressGateway: {listenPort: 15001}\n"
        "  secrets: {provider: file, path: ./secrets}\n"
    )


def destination_yaml(i: int) -> str:
    """Every fifth destination is a plaintext local service; the rest originate TLS."""
    name = _dest_name(i)
    lines = [HEADER + "kind: Destination", f"metadata: {{name: {name}, labels: {{n: '{i}'}}}}"]
    lines.append("spec:")
    if i % 5 == 0:
        lines += [
            f"  host: {name}.internal",
            "  port: 80",
            "  tls: none",
            f"  address: 127.0.0.1:{10000 + i}",
        ]
    else:
        lines += [f"  host: {name}.tools.example", "  port: 443", "  tls: originate"]
        if i % 2 == 1:
            lines += [
                "  credentials:",
                "    header: Authorization",
                f"    secret: {name}-key",
                '    format: "Bearer {secret}"',
            ]
        if i % 3 == 1:
            lines.append("  identity: jwt")
    return "\n".join(lines) + "\n"


def rule_yaml(agent: int, k: int, destinations: int) -> str:
    """Rule k of an agent; the five shapes cycle, later cycles get their own path segment."""
    dest = _dest_name((agent * 7 + k * 11) % destinations)
    seg = f"/r{k // 5}" if k >= 5 else ""
    shape = k % 5
    out = f"    - destination: {dest}\n"
    if shape == 0:
        out += (
            "      methods: [GET]\n"
            f'      paths: ["{seg}/v1/items", "{seg}/v1/items/*"]\n'
            f"      rateLimit: {{requests: {60 + agent % 50}, per: 1m}}\n"
        )
    elif shape == 1:
        out += (
            "      methods: [POST]\n"
            f'      paths: ["{seg}/v1/chat/completions", "{seg}/v1/embeddings"]\n'
            "      rateLimit: {requests: 30, per: 1m}\n"
        )
    elif shape == 2:
        out += (
            "      methods: [GET, POST]\n"
            f'      paths: ["{seg}/api/*"]\n'
            "      headers:\n"
            f"        - {{name: x-team, value: team-{agent % 20}}}\n"
            "        - {name: x-trace}\n"
        )
    elif shape == 3:
        out += (
            "      methods: [POST]\n"
            f'      paths: ["{seg}/mcp"]\n'
            "      tools: [read_file, search_code]\n"
            "      rateLimit: {requests: 600, per: 1h}\n"
        )
    else:
        out += (
            f'      methods: [GET, HEAD]\n      paths: ["{seg}/status"]\n'
            "      rateLimit: {requests: 10, per: 10s}\n"
        )
    return out


def agent_name(i: int) -> str:
    return f"agent-{i:04d}"


def agent_yaml(i: int, rules: int, destinations: int) -> str:
    name = agent_name(i)
    body = "".join(rule_yaml(i, k, destinations) for k in range(rules))
    return (
        HEADER + "kind: AgentPolicy\n"
        f"metadata: {{name: {name}, labels: {{team: team-{i % 20}}}}}\n"
        f"spec:\n  agent: {name}\n  egress:\n{body}"
    )


def agent_file(index: int) -> str:
    return f"agents/agents-{index:04d}.yaml"


def write_policy(root: Path, agents: int, destinations: int, rules: int, per_file: int) -> None:
    (root / "agents").mkdir(parents=True)
    (root / "mesh.yaml").write_text(mesh_yaml())
    dests = "---\n".join(destination_yaml(i) for i in range(destinations))
    (root / "destinations.yaml").write_text(dests)
    for start in range(0, agents, per_file):
        docs = [
            agent_yaml(i, rules, destinations) for i in range(start, min(agents, start + per_file))
        ]
        (root / agent_file(start // per_file)).write_text("---\n".join(docs))


def change_one_agent(
    files: Mapping[str, str], root: Path, agent: int, per_file: int, delta: int
) -> dict[str, str]:
    """A copy of `files` where `agent`'s first rateLimit.requests is increased by `delta`."""
    path = str(root / agent_file(agent // per_file))
    text = files[path]
    start = text.index(f"  agent: {agent_name(agent)}\n")
    match = _REQUESTS.search(text, start)
    if match is None:
        raise SystemExit(f"{agent_name(agent)} has no rateLimit to change")
    new = f"requests: {int(match.group(1)) + delta}"
    changed = dict(files)
    changed[path] = text[: match.start()] + new + text[match.end() :]
    return changed


# --------------------------------------------------------------------------- measurement


@dataclass
class Series:
    name: str
    samples: list[float]
    target: float | None = None

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.median < self.target else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "best_s": self.best,
            "median_s": self.median,
            "samples_s": self.samples,
            "target_s": self.target,
            "verdict": self.verdict or None,
        }


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds taken by fn(*args) after a full collection, and its result."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def snapshot_stats(snapshot: Snapshot) -> dict[str, Any]:
    per_type: dict[str, dict[str, int]] = {}
    for type_url, bucket in snapshot.resources.items():
        short = type_url.rsplit(".", 1)[-1]
        per_type[short] = {
            "count": len(bucket),
            "bytes": sum(len(r.any_bytes) for r in bucket.values()),
        }
    return {
        "resources": sum(t["count"] for t in per_type.values()),
        "bytes": sum(t["bytes"] for t in per_type.values()),
        "per_type": per_type,
    }


def changed_resources(old: Snapshot, new: Snapshot) -> int:
    """Resources added, removed or with a different content version."""
    count = 0
    for type_url in set(old.resources) | set(new.resources):
        a, b = old.of_type(type_url), new.of_type(type_url)
        for name in set(a) | set(b):
            if name not in a or name not in b or a[name].version != b[name].version:
                count += 1
    return count


def load(files: Mapping[str, str]) -> PolicyModel:
    try:
        return load_policy_texts(files)
    except PolicyError as e:  # a bug in the generator, not a measurement
        raise SystemExit("generated policy is invalid:\n" + "\n".join(e.problems[:20])) from e


def profile_change(files: Mapping[str, str], top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    build_snapshots(load(files))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    read_s, load_s, build_s, total_s = [], [], [], []
    change_s, change_build_s = [], []
    target_agent = args.agents // 2
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        root = Path(tmp) / "policy"
        write_policy(root, args.agents, args.destinations, args.rules, args.agents_per_file)
        files: dict[str, str] = {}
        snapshots: dict[str, Snapshot] = {}
        model: PolicyModel | None = None
        for _ in range(args.repeat):
            # each full compile is a cold start: no parsed files or translations remembered
            clear_policy_cache()
            clear_translation_caches()
            t_read, files = timed(read_policy_files, root)
            t_load, model = timed(load, files)
            t_build, snapshots = timed(build_snapshots, model)
            read_s.append(t_read)
            load_s.append(t_load)
            build_s.append(t_build)
            total_s.append(t_read + t_load + t_build)
        assert model is not None
        base = snapshots[GATEWAY_GROUP]
        source_bytes = sum(len(t.encode()) for t in files.values())

        new_model: PolicyModel | None = None
        new_snapshots: dict[str, Snapshot] = {}
        for i in range(args.repeat):
            changed = change_one_agent(files, root, target_agent, args.agents_per_file, i + 1)
            t_load, new_model = timed(load, changed)
            t_build, new_snapshots = timed(build_snapshots, new_model)
            change_s.append(t_load + t_build)
            change_build_s.append(t_build)
        assert new_model is not None
        changed_agents = sum(a != b for a, b in zip(model.agents, new_model.agents, strict=True))
        profile = profile_change(changed, args.profile) if args.profile else None

    new = new_snapshots[GATEWAY_GROUP]
    series = [
        Series("read files (read_policy_files)", read_s),
        Series("load+validate+compile (load_policy_texts)", load_s),
        Series("build snapshots (build_snapshots)", build_s),
        Series("full compile: read+load+build", total_s, FULL_TARGET_S),
        Series("one-agent change: load+build", change_s, CHANGE_TARGET_S),
        Series("one-agent change: build_snapshots only", change_build_s),
    ]
    return {
        "benchmark": "policy_compile",
        "params": {
            "agents": args.agents,
            "destinations": args.destinations,
            "rules": args.rules,
            "repeat": args.repeat,
            "agents_per_file": args.agents_per_file,
        },
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "policy": {
            "files": len(files),
            "source_bytes": source_bytes,
            "model_agents": len(model.agents),
            "model_rules": sum(len(a.rules) for a in model.agents),
            "model_destinations": len(model.destinations),
        },
        "timings": {s.name: s.as_json() for s in series},
        "gateway_snapshot": snapshot_stats(base),
        "change": {
            "agent": agent_name(target_agent),
            "agents_changed_in_model": changed_agents,
            "policy_version": [base.policy_version, new.policy_version],
            "resources_changed_in_snapshot": changed_resources(base, new),
        },
        "profile": profile,
        "_series": series,
    }


def print_table(result: dict[str, Any]) -> None:
    p, pol = result["params"], result["policy"]
    print(
        f"policy: {p['agents']} agents x {p['destinations']} destinations x {p['rules']} rules"
        f" ({pol['model_rules']} rules compiled), {pol['files']} files,"
        f" {pol['source_bytes'] / 1e6:.2f} MB YAML; repeat={p['repeat']};"
        f" python {result['environment']['python']}"
    )
    print()
    width = max(len(s.name) for s in result["_series"])
    print(f"{'step':<{width}}  {'best':>9}  {'median':>9}  {'target':>9}  result")
    for s in result["_series"]:
        target = f"< {s.target * 1000:.0f} ms" if s.target is not None else ""
        print(
            f"{s.name:<{width}}  {s.best * 1000:>6.1f} ms  {s.median * 1000:>6.1f} ms"
            f"  {target:>9}  {s.verdict}"
        )
    snap, change = result["gateway_snapshot"], result["change"]
    per_type = ", ".join(f"{k} {v['count']}" for k, v in snap["per_type"].items())
    print()
    print(
        f"gateway snapshot: {snap['resources']} Envoy resources ({per_type}),"
        f" {snap['bytes']:,} bytes serialised"
    )
    print(
        f"change: {change['agent']} rateLimit.requests edited; {change['agents_changed_in_model']}"
        f" agent changed in the model; {change['resources_changed_in_snapshot']} snapshot"
        f" resources changed; policy version {change['policy_version'][0]} ->"
        f" {change['policy_version'][1]}"
    )
    if result["profile"]:
        print()
        print("profile of one one-agent change (load_policy_texts + build_snapshots):")
        print(result["profile"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--agents", type=int, default=1000, help="AgentPolicies (default 1000)")
    parser.add_argument("--destinations", type=int, default=50, help="Destinations (default 50)")
    parser.add_argument("--rules", type=int, default=5, help="egress rules per agent (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per step (default 3)")
    parser.add_argument(
        "--agents-per-file", type=int, default=1, help="AgentPolicies per YAML file (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one one-agent change and print the top N functions",
    )
    args = parser.parse_args(argv)
    for name in ("agents", "destinations", "rules", "repeat", "agents_per_file"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.destinations > 999 or args.agents > 9999:
        parser.error("at most 999 destinations and 9999 agents (names are zero-padded)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        result.pop("_series")
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
