"""Cross-document checks and compilation of validated documents into the immutable PolicyModel.

Single documents are already schema-valid here; this is where references (rule -> destination,
group -> agent), uniqueness, tls compatibility and rule reachability are checked, with positions
of both sides in the message. Checks that need every document (missing Mesh, unknown references)
are skipped when some file did not parse, so one syntax error doesn't cascade into false ones.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

from meshgate.mcp.canonical import NotCanonical, canonical_text
from meshgate.mcp.strictjson import fold
from meshgate.policy import schema, syntax
from meshgate.policy.delegation import ttl_seconds
from meshgate.policy.documents import CheckedDoc, did_you_mean
from meshgate.policy.model import (
    AgentPolicy,
    ArgumentRule,
    Budget,
    BudgetUnit,
    Concurrency,
    ConsulConfig,
    ConsulService,
    Credentials,
    Delegation,
    Destination,
    EgressRule,
    GroupBudget,
    HeaderMatch,
    Llm,
    Mesh,
    PolicyModel,
    Price,
    RateLimit,
    SecretsConfig,
    ToolRule,
)
from meshgate.policy.problems import Pos, Problem, describe
from meshgate.policy.yamlsource import Path, YamlDoc


@dataclass(frozen=True)
class SourceMap:
    """Where compiled objects were written, as "file:line", for lint findings and tooling.

    `rules` is keyed by (agent, index into that agent's compiled rules); group and default rules
    point at the group / DefaultPolicy document that declared them.
    """

    mesh: str = ""
    destinations: dict[str, str] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)
    rules: dict[tuple[str, int], str] = field(default_factory=dict)


_period_seconds = lru_cache(maxsize=1024)(syntax.period_seconds)  # pure; few distinct periods


@dataclass(frozen=True)
class _Rule:
    rule: EgressRule
    doc: YamlDoc
    path: Path  # to the rule mapping

    @cached_property
    def pos(self) -> Pos:
        return self.doc.key_pos((*self.path, "destination"))


@dataclass(frozen=True)
class _Compiled:
    """The compiled rules of one document and the problems their checks reported, with all that
    those depend on besides the (immutable, cached) document itself."""

    src: YamlDoc
    rule_docs: list[schema.RuleDoc] | None
    base: Path
    complete: bool
    dest_names: frozenset[str]
    tls: tuple[_DestFacts | None, ...]  # per rule: what its checks read of its destination
    rules: tuple[_Rule, ...]
    problems: tuple[Problem, ...]

    def matches(
        self,
        src: YamlDoc,
        rule_docs: list[schema.RuleDoc] | None,
        base: Path,
        complete: bool,
        dest_names: frozenset[str],
        tls: tuple[_DestFacts | None, ...],
    ) -> bool:
        return (
            self.src is src
            and self.rule_docs is rule_docs
            and self.base == base
            and self.complete == complete
            and (self.dest_names is dest_names or self.dest_names == dest_names)
            and self.tls == tls
        )


_MemoKey = tuple[int, Path]
_DestFacts = tuple[str, bool, bool]  # tls, is an llm destination, has prices


class RuleMemo:
    """Compiled rules of the AgentPolicy / AgentGroup / DefaultPolicy documents of the latest
    compile, keyed on the document object (the loader's per-file cache hands the same objects to
    the next load while a file is unchanged). An entry is used only while everything the rule
    checks read is unchanged too: the destination names, each referenced destination's tls and
    whether the policy is complete; its problems are replayed in place, so output is identical
    to compiling afresh. Bounded by one policy; thread-safe like the per-file cache."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[_MemoKey, _Compiled] = {}
        self._names: frozenset[str] = frozenset()

    def get(self, key: _MemoKey) -> _Compiled | None:
        with self._lock:
            return self._entries.get(key)

    def intern_names(self, names: frozenset[str]) -> frozenset[str]:
        """`names`, or an equal set seen before (so unchanged entries compare by identity)."""
        with self._lock:
            if self._names == names:
                return self._names
            self._names = names
            return names

    def keep_only(self, entries: dict[_MemoKey, _Compiled]) -> None:
        with self._lock:
            self._entries = dict(entries)

    def clear(self) -> None:
        with self._lock:
            self._entries = {}
            self._names = frozenset()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class _Compiler:
    def __init__(
        self,
        docs: Sequence[CheckedDoc],
        complete: bool,
        root: str,
        memo: RuleMemo | None = None,
    ) -> None:
        self.docs = docs
        self.complete = complete
        self.root = root
        self.problems: list[Problem] = []
        self.destinations: dict[str, Destination] = {}
        names = frozenset(d.name for d in docs if d.kind == "Destination" and d.name)
        self.dest_names: frozenset[str] = memo.intern_names(names) if memo else names
        self.sources = SourceMap()
        self.memo = memo
        self.memo_used: dict[_MemoKey, _Compiled] = {}
        self.mesh_consul: bool | None = None  # None: unknown (no readable Mesh)

    def error(self, pos: Pos, message: str) -> None:
        self.problems.append(Problem(pos, message))

    def unique(self, kind: str) -> list[CheckedDoc]:
        """Docs of `kind`, first of each name only; later duplicates are reported."""
        seen: dict[str, CheckedDoc] = {}
        out: list[CheckedDoc] = []
        for d in self.docs:
            if d.kind != kind:
                continue
            if d.name is None:
                out.append(d)
                continue
            first = seen.get(d.name)
            if first is None:
                seen[d.name] = d
                out.append(d)
                continue
            where = first.source.value_pos(("metadata", "name"))
            self.error(
                d.source.value_pos(("metadata", "name")),
                f'duplicate {kind} name "{d.name}" (first defined at {where})',
            )
        return out

    def single(self, kind: str, required: bool) -> CheckedDoc | None:
        found = [d for d in self.docs if d.kind == kind]
        for extra in found[1:]:
            self.error(
                extra.source.key_pos(("kind",)),
                f"only one {kind} is allowed (another is defined at "
                f"{found[0].source.key_pos(('kind',))})",
            )
        if not found and required and self.complete:
            self.error(Pos(self.root), f"no {kind} document found; exactly one is required")
        return found[0] if found else None

    # -- mesh ------------------------------------------------------------------------------------

    def mesh(self) -> Mesh | None:
        doc = self.single("Mesh", required=True)
        if doc is None or not isinstance(doc.model, schema.MeshDoc):
            return None
        self.sources = SourceMap(mesh=doc.source.start.short)
        spec = doc.model.spec
        secrets = SecretsConfig()
        if isinstance(spec.secrets, schema.FileSecretsDoc):
            secrets = SecretsConfig(provider="file", path=spec.secrets.path)
        elif isinstance(spec.secrets, schema.EnvSecretsDoc):
            secrets = SecretsConfig(provider="env")
        elif isinstance(spec.secrets, schema.VaultSecretsDoc):
            options: list[tuple[str, str]] = []
            for key, value in schema.vault_options(spec.secrets).items():
                if isinstance(value, dict | list) or value is None:
                    self.error(
                        doc.source.value_pos(("spec", "secrets", key)),
                        f"secrets.{key}: expected a string, got {describe(value)}",
                    )
                    continue
                text = ("true" if value else "false") if isinstance(value, bool) else str(value)
                options.append((key, text))
            secrets = SecretsConfig(provider="vault", options=tuple(sorted(options)))
        port = spec.egressGateway.listenPort if spec.egressGateway else 15001
        consul = self._consul_config(doc.source, spec.consul)
        self.mesh_consul = spec.consul is not None
        capacity = _concurrency(spec.egressGateway.capacity) if spec.egressGateway else None
        return Mesh(
            name=doc.model.metadata.name,
            trust_domain=spec.trustDomain,
            gateway_listen_port=port,
            gateway_capacity=capacity,
            secrets=secrets,
            consul=consul,
        )

    def _consul_config(self, src: YamlDoc, doc: schema.ConsulMeshDoc | None) -> ConsulConfig | None:
        if doc is None:
            return None
        if doc.caFile is not None and not doc.address.startswith("https://"):
            self._bad(src, ("spec", "consul", "caFile"), "consul.caFile needs an https:// address")
        return ConsulConfig(doc.address, doc.tokenSecret, doc.datacenter, doc.caFile)

    # -- destinations ----------------------------------------------------------------------------

    def destination_models(self) -> None:
        by_endpoint: dict[tuple[str, int], tuple[str, Pos]] = {}
        for d in self.unique("Destination"):
            if not isinstance(d.model, schema.DestinationDoc):
                continue
            spec, src = d.model.spec, d.source
            name = d.model.metadata.name
            ok = True
            if spec.caFile is not None and spec.tls != "originate":
                ok = self._bad(
                    src,
                    ("spec", "caFile"),
                    f"caFile is only valid with tls: "
                    f"originate (this destination uses tls: {spec.tls})",
                )
            if spec.intercept is not None and spec.tls != "originate":
                ok = self._bad(
                    src,
                    ("spec", "intercept"),
                    f"intercept is only valid with tls: originate (this destination uses "
                    f"tls: {spec.tls}, whose CONNECT the sidecar never opens)",
                )
            if spec.tls == "passthrough" and spec.credentials is not None:
                ok = self._bad(
                    src,
                    ("spec", "credentials"),
                    "credentials cannot be used with "
                    "tls: passthrough (the gateway cannot add headers to "
                    "encrypted traffic)",
                )
            if spec.tls == "passthrough" and spec.identity == "jwt":
                ok = self._bad(
                    src,
                    ("spec", "identity"),
                    "identity: jwt cannot be used with "
                    "tls: passthrough (the gateway cannot add headers to "
                    "encrypted traffic)",
                )
            if spec.consul is not None and spec.address is not None:
                ok = self._bad(
                    src,
                    ("spec", "consul"),
                    "a destination has either address or consul, not both "
                    "(consul finds the instances the address would name)",
                )
            elif spec.consul is not None and self.mesh_consul is False:
                ok = self._bad(
                    src,
                    ("spec", "consul"),
                    "consul needs a consul block in the Mesh spec (consul: {address: ...})",
                )
            for key in ("llm", "concurrency"):
                if spec.tls == "passthrough" and getattr(spec, key) is not None:
                    ok = self._bad(
                        src,
                        ("spec", key),
                        f"{key} cannot be used with tls: passthrough (the gateway sees only "
                        f"an encrypted tunnel)",
                    )
            endpoint = (spec.host, spec.port)
            host_pos = src.value_pos(("spec", "host"))
            if endpoint in by_endpoint:
                other, where = by_endpoint[endpoint]
                ok = self._bad(
                    src,
                    ("spec", "host"),
                    f'host "{spec.host}" port {spec.port} is '
                    f'already used by destination "{other}" (at {where})',
                    key=False,
                )
            else:
                by_endpoint[endpoint] = (name, host_pos)
            if not ok:
                continue
            creds = spec.credentials
            credentials = Credentials(creds.header, creds.secret, creds.format) if creds else None
            labels = (d.model.metadata.labels or {}).items()
            c = spec.consul
            consul = ConsulService(c.service, c.tag, c.passingOnly) if c is not None else None
            self.destinations[name] = Destination(
                name=name,
                host=spec.host,
                port=spec.port,
                tls=spec.tls,
                address=syntax.parse_address(spec.address) if spec.address else None,
                ca_file=spec.caFile,
                intercept=spec.intercept is not False,
                credentials=credentials,
                identity=spec.identity,
                labels=tuple(sorted(labels)),
                consul=consul,
                llm=_llm(spec.llm),
                concurrency=_concurrency(spec.concurrency),
            )
            self.sources.destinations[name] = src.start.short

    def _bad(self, src: YamlDoc, path: Path, message: str, key: bool = True) -> bool:
        self.error(src.key_pos(path) if key else src.value_pos(path), message)
        return False

    # -- rules -----------------------------------------------------------------------------------

    def rules(self, src: YamlDoc, base: Path, docs: list[schema.RuleDoc] | None) -> list[_Rule]:
        """Check and compile the rules at `base`, reusing the memo's result when it applies."""
        if self.memo is None:
            return self._compile_rules(src, base, docs)
        key = (id(src), base)
        tls = tuple(_facts(self.destinations.get(r.destination)) for r in docs or [])
        entry = self.memo_used.get(key) or self.memo.get(key)
        if entry is not None and entry.matches(
            src, docs, base, self.complete, self.dest_names, tls
        ):
            self.problems += entry.problems
        else:
            start = len(self.problems)
            rules = self._compile_rules(src, base, docs)
            entry = _Compiled(
                src,
                docs,
                base,
                self.complete,
                self.dest_names,
                tls,
                tuple(rules),
                tuple(self.problems[start:]),
            )
        self.memo_used[key] = entry
        return list(entry.rules)

    def _compile_rules(
        self, src: YamlDoc, base: Path, docs: list[schema.RuleDoc] | None
    ) -> list[_Rule]:
        out: list[_Rule] = []
        for i, r in enumerate(docs or []):
            path = (*base, i)
            self._check_rule(src, path, r)
            headers = tuple(HeaderMatch(h.name.lower(), h.value) for h in r.headers or [])
            rate = None
            if r.rateLimit is not None:
                rl = r.rateLimit
                rate = RateLimit(rl.requests, _period_seconds(rl.per), rl.scope, rl.onStoreFailure)
            rule = EgressRule(
                destination=r.destination,
                methods=tuple(r.methods or ()),
                paths=tuple(r.paths or ()),
                headers=headers,
                tools=_tool_names(r.tools),
                tool_rules=self._tool_rules(src, path, r.tools),
                rate_limit=rate,
                concurrency=_concurrency(r.concurrency),
                models=tuple(r.models or ()),
                max_tokens=r.maxTokens,
                budgets=self.budgets(src, (*path, "budgets"), r.budgets),
                mode=r.mode or "enforce",
            )
            out.append(_Rule(rule, src, path))
        return out

    def _check_rule(self, src: YamlDoc, path: Path, r: schema.RuleDoc) -> None:
        if r.destination not in self.dest_names:
            if self.complete:
                hint = did_you_mean(r.destination, sorted(self.dest_names))
                self.error(
                    src.key_pos((*path, "destination")),
                    f'unknown destination "{r.destination}"{hint}',
                )
            return
        lists = {
            "methods": r.methods,
            "paths": r.paths,
            "tools": list(_tool_names(r.tools)) or None,
            "headers": [h.name.lower() for h in r.headers] if r.headers else None,
        }
        for key, items in lists.items():
            seen: set[str] = set()
            for j, item in enumerate(items or []):
                if item in seen:
                    self.error(
                        src.value_pos((*path, key, j)), f'{key}[{j}] "{item}" is listed twice'
                    )
                seen.add(item)
        dest = self.destinations.get(r.destination)
        if dest is None:
            return
        if dest.tls == "passthrough":
            paced: dict[str, object] = {**lists, "models": r.models}
            paced.update(concurrency=r.concurrency, budgets=r.budgets)
            for key, given in paced.items():
                if given:
                    self.error(
                        src.key_pos((*path, key)),
                        f'{key} cannot apply: destination "{r.destination}" uses '
                        f"tls: passthrough, so the gateway sees only the host",
                    )
            if r.maxTokens is not None:
                self.error(
                    src.key_pos((*path, "maxTokens")),
                    f'maxTokens cannot apply: destination "{r.destination}" uses '
                    f"tls: passthrough, so the gateway sees only the host",
                )
            return
        self._check_llm_rule(src, path, r, dest)

    def _check_llm_rule(
        self, src: YamlDoc, path: Path, r: schema.RuleDoc, dest: Destination
    ) -> None:
        """Model rules and token or cost budgets need a body the gateway can read usage from."""
        no_llm = (
            f'needs an LLM destination: "{dest.name}" has no llm block '
            f"(llm: {{api: openai}} or {{api: anthropic}})"
        )
        for key, value in (("models", r.models), ("maxTokens", r.maxTokens)):
            if value is not None and dest.llm is None:
                self.error(src.key_pos((*path, key)), f"{key} {no_llm}")
        for j, b in enumerate(r.budgets or []):
            if not (b.tokens or b.inputTokens or b.outputTokens or b.cost is not None):
                continue
            at = src.key_pos((*path, "budgets", j))
            if dest.llm is None:
                self.error(at, f'budget "{b.name}" counts tokens or cost, which {no_llm}')
            elif b.cost is not None and not dest.llm.prices:
                self.error(
                    at,
                    f'budget "{b.name}" counts cost, but destination "{dest.name}" has no '
                    "llm.prices",
                )

    def _tool_rules(
        self, src: YamlDoc, path: Path, entries: list[str | schema.ToolDoc] | None
    ) -> tuple[ToolRule, ...]:
        out: list[ToolRule] = []
        for j, entry in enumerate(entries or []):
            if isinstance(entry, str):
                continue
            at = (*path, "tools", j)
            where = f"tools[{j}]"
            declared = list(entry.arguments or {})
            folded: dict[str, str] = {}
            for name in declared:
                other = folded.setdefault(fold(name), name)
                if other != name:
                    self.error(
                        src.key_pos((*at, "arguments", name)),
                        f'{where}.arguments: "{other}" and "{name}" differ only in case '
                        f"(some servers read them as one argument)",
                    )
            arguments = tuple(
                self._argument_rule(src, (*at, "arguments", name), f"{where}.arguments.{name}", a)
                for name, a in (entry.arguments or {}).items()
            )
            seen: set[str] = set()
            for k, name in enumerate(entry.required or []):
                pos = src.value_pos((*at, "required", k))
                if name in seen:
                    self.error(pos, f'{where}.required[{k}] "{name}" is listed twice')
                elif name not in declared:
                    self.error(
                        pos,
                        f'{where}.required[{k}]: "{name}" is not under arguments '
                        f"(add `{name}: {{}}` there to allow any value)",
                    )
                seen.add(name)
            required = declared if entry.required is None else entry.required
            out.append(ToolRule(entry.name, arguments, tuple(required), entry.additionalArguments))
        return tuple(out)

    def _argument_rule(
        self, src: YamlDoc, path: Path, where: str, a: schema.ArgumentDoc
    ) -> ArgumentRule:
        given = [k for k in _ARGUMENT_KEYWORDS if k in a.model_fields_set]
        given = [k for k in given if k == "const" or getattr(a, k) is not None]
        fixed = [k for k in given if k in ("const", "enum")]
        for k in given:
            if fixed and k != fixed[0]:
                self.error(
                    src.key_pos((*path, k)),
                    f"{where}: {k} cannot be combined with {fixed[0]}, "
                    f"which already fixes the allowed values",
                )
        strings = [k for k in given if k in ("pattern", "prefix", "maxLength")]
        numbers = [k for k in given if k in ("minimum", "maximum")]
        if strings and numbers:
            self.error(
                src.key_pos((*path, numbers[0])),
                f"{where}: {strings[0]} applies to strings and {numbers[0]} to numbers, "
                f"so no value can pass both",
            )
        if a.minimum is not None and a.maximum is not None and a.minimum > a.maximum:
            self.error(
                src.value_pos((*path, "maximum")),
                f"{where}: maximum {a.maximum} is below minimum {a.minimum}",
            )
        const = None
        if "const" in given:
            const = self._canonical(src, (*path, "const"), f"{where}.const", a.const)
        enum: list[str] = []
        for i, value in enumerate(a.enum or []):
            text = self._canonical(src, (*path, "enum", i), f"{where}.enum[{i}]", value)
            if text is not None and text in enum:
                self.error(src.value_pos((*path, "enum", i)), f"{where}.enum[{i}] is listed twice")
            elif text is not None:
                enum.append(text)
        return ArgumentRule(
            name=path[-1] if isinstance(path[-1], str) else str(path[-1]),
            const=const,
            enum=tuple(enum),
            pattern=a.pattern,
            prefix=a.prefix,
            max_length=a.maxLength,
            minimum=a.minimum,
            maximum=a.maximum,
        )

    def _canonical(self, src: YamlDoc, path: Path, where: str, value: object) -> str | None:
        try:
            return canonical_text(value)
        except NotCanonical as e:
            self.error(src.value_pos(path), f"{where}: not a JSON value ({e})")
            return None

    def budgets(
        self, src: YamlDoc, base: Path, docs: list[schema.BudgetDoc] | None
    ) -> tuple[Budget, ...]:
        out: list[Budget] = []
        seen: dict[str, Pos] = {}
        for j, b in enumerate(docs or []):
            path = (*base, j)
            given = [(key, unit) for key, unit in _MEASURES if getattr(b, key) is not None]
            if len(given) != 1:
                keys = ", ".join(key for key, _ in _MEASURES)
                found = " and ".join(key for key, _ in given) or "none"
                self.error(
                    src.key_pos((*path, "name")),
                    f'budget "{b.name}" needs exactly one of {keys} (found {found})',
                )
                continue
            if b.name in seen:
                self.error(
                    src.value_pos((*path, "name")),
                    f'budget "{b.name}" is defined twice (first at {seen[b.name]})',
                )
                continue
            seen[b.name] = src.value_pos((*path, "name"))
            key, unit = given[0]
            raw = getattr(b, key)
            limit = syntax.micro_usd(raw) if unit == "cost_micro_usd" else int(raw)
            if limit < 1:
                self.error(src.value_pos((*path, key)), f"budgets[{j}].{key}: must be above 0")
                continue
            out.append(Budget(b.name, unit, limit, b.window, b.onStoreFailure))
        return tuple(out)

    # -- agents ----------------------------------------------------------------------------------

    def agents(self) -> tuple[list[AgentPolicy], list[AgentPolicy]]:
        """The enforced AgentPolicies, and the shadow ones (`mode: shadow`: candidate versions
        of an agent's own rules and budgets, beside its enforced AgentPolicy)."""
        own: dict[str, tuple[str, list[_Rule], YamlDoc]] = {}
        own_budgets: dict[str, tuple[Budget, ...]] = {}
        shadow_own: dict[str, tuple[str, list[_Rule], tuple[Budget, ...], CheckedDoc]] = {}
        delegations: dict[str, Delegation] = {}
        shared: dict[str, list[GroupBudget]] = {}
        declared: set[str] = set()
        first_doc: dict[tuple[str, bool], CheckedDoc] = {}
        for d in self.unique("AgentPolicy"):
            spec = d.source.data.get("spec") if isinstance(d.source.data, dict) else None
            agent = spec.get("agent") if isinstance(spec, dict) else None
            shadow = isinstance(spec, dict) and spec.get("mode") == "shadow"
            if isinstance(agent, str):
                if not shadow:
                    declared.add(agent)
                if (agent, shadow) in first_doc:
                    where = first_doc[(agent, shadow)].source.value_pos(("spec", "agent"))
                    what = "a shadow AgentPolicy" if shadow else "an AgentPolicy"
                    self.error(
                        d.source.value_pos(("spec", "agent")),
                        f'agent "{agent}" already has {what} (at {where})',
                    )
                    continue
                first_doc[(agent, shadow)] = d
            if isinstance(d.model, schema.AgentPolicyDoc):
                m = d.model
                rules = self.rules(d.source, ("spec", "egress"), m.spec.egress)
                budgets = self.budgets(d.source, ("spec", "budgets"), m.spec.budgets)
                if shadow:
                    shadow_own[m.spec.agent] = (m.metadata.name, rules, budgets, d)
                    continue
                own[m.spec.agent] = (m.metadata.name, rules, d.source)
                own_budgets[m.spec.agent] = budgets
                if m.spec.delegation is not None:
                    delegations[m.spec.agent] = Delegation(
                        m.spec.delegation.maxSubAgents, ttl_seconds(m.spec.delegation.maxTtl)
                    )

        group_rules: dict[str, list[_Rule]] = {}
        groups = [d for d in self.unique("AgentGroup") if isinstance(d.model, schema.AgentGroupDoc)]
        for d in sorted(groups, key=lambda g: g.name or ""):
            assert isinstance(d.model, schema.AgentGroupDoc)
            rules = self.rules(d.source, ("spec", "egress"), d.model.spec.egress)
            if d.model.spec.mode == "shadow":
                rules = [_Rule(replace(r.rule, mode="shadow"), r.doc, r.path) for r in rules]
            group = d.model.metadata.name
            budgets = self.budgets(d.source, ("spec", "budgets"), d.model.spec.budgets)
            seen: set[str] = set()
            for j, agent in enumerate(d.model.spec.agents):
                pos = d.source.value_pos(("spec", "agents", j))
                if agent in seen:
                    self.error(pos, f'agent "{agent}" is listed twice')
                    continue
                seen.add(agent)
                if agent not in declared:
                    if self.complete:
                        self.error(
                            pos,
                            f'agent "{agent}" has no AgentPolicy (group rules apply '
                            f"only to agents declared with an AgentPolicy)",
                        )
                    continue
                group_rules.setdefault(agent, []).extend(rules)
                shared.setdefault(agent, []).extend(GroupBudget(group, b) for b in budgets)

        default = self.single("DefaultPolicy", required=False)
        default_rules: list[_Rule] = []
        if default is not None and isinstance(default.model, schema.DefaultPolicyDoc):
            default_rules = self.rules(
                default.source, ("spec", "egress"), default.model.spec.egress
            )

        def compose(
            agent: str, name: str, rules: list[_Rule], budgets: tuple[Budget, ...]
        ) -> tuple[AgentPolicy, list[_Rule]]:
            """The agent's own rules, then its groups', then the DefaultPolicy's."""
            merged = rules + group_rules.get(agent, []) + default_rules
            self._reachability(agent, merged)
            policy = AgentPolicy(
                name=name,
                agent=agent,
                rules=tuple(r.rule for r in merged),
                budgets=budgets,
                group_budgets=tuple(shared.get(agent, ())),
                delegation=delegations.get(agent),
            )
            return policy, merged

        out: list[AgentPolicy] = []
        for agent in sorted(own):
            name, rules, src = own[agent]
            policy, merged = compose(agent, name, rules, own_budgets.get(agent, ()))
            out.append(policy)
            self.sources.agents[agent] = src.start.short
            for i, r in enumerate(merged):
                self.sources.rules[(agent, i)] = r.pos.short
        shadows: list[AgentPolicy] = []
        for agent in sorted(shadow_own):
            name, rules, budgets, doc = shadow_own[agent]
            if agent not in own:
                if self.complete:
                    self.error(
                        doc.source.value_pos(("spec", "agent")),
                        f'shadow AgentPolicy for agent "{agent}", which has no enforced '
                        "AgentPolicy to compare with (write one, even with no rules)",
                    )
                continue
            shadows.append(compose(agent, name, rules, budgets)[0])
        return out, shadows

    def _reachability(self, agent: str, rules: list[_Rule]) -> None:
        for j, later in enumerate(rules):
            for earlier in rules[:j]:
                a, b = earlier.rule, later.rule
                if a.destination != b.destination:
                    continue
                if _allows_everything(a):
                    self.error(
                        later.pos,
                        f'unreachable rule for agent "{agent}": the rule at '
                        f'{earlier.pos} already allows all traffic to "{a.destination}"',
                    )
                    break
                if _same(a, b):
                    self.error(
                        later.pos,
                        f'duplicate rule for agent "{agent}": same as the rule at {earlier.pos}',
                    )
                    break


def _llm(doc: schema.LlmDoc | None) -> Llm | None:
    if doc is None:
        return None
    prices = tuple(
        Price(model, str(p.input), str(p.output)) for model, p in (doc.prices or {}).items()
    )
    return Llm(doc.api, prices)


def _facts(dest: Destination | None) -> _DestFacts | None:
    if dest is None:
        return None
    return (dest.tls, dest.llm is not None, bool(dest.llm and dest.llm.prices))


_ARGUMENT_KEYWORDS = ("const", "enum", "pattern", "prefix", "maxLength", "minimum", "maximum")


def _tool_names(entries: list[str | schema.ToolDoc] | None) -> tuple[str, ...]:
    """Every entry's name, plain or with argument rules: Envoy's routes match on these."""
    return tuple(e if isinstance(e, str) else e.name for e in entries or ())


def _concurrency(doc: schema.ConcurrencyDoc | None) -> Concurrency | None:
    return Concurrency(doc.max, syntax.max_wait_ms(doc.maxWait)) if doc is not None else None


_MEASURES: tuple[tuple[str, BudgetUnit], ...] = (
    ("requests", "requests"),
    ("tokens", "tokens"),
    ("inputTokens", "input_tokens"),
    ("outputTokens", "output_tokens"),
    ("cost", "cost_micro_usd"),
)


def _allows_everything(r: EgressRule) -> bool:
    limited = r.rate_limit or r.concurrency or r.models or r.max_tokens or r.budgets
    return not (r.methods or r.paths or r.headers or r.tools or limited)


def _same(a: EgressRule, b: EgressRule) -> bool:
    return (
        set(a.methods) == set(b.methods)
        and set(a.paths) == set(b.paths)
        and set(a.headers) == set(b.headers)
        and set(a.tools) == set(b.tools)
        and set(a.tool_rules) == set(b.tool_rules)
        and a.rate_limit == b.rate_limit
        and a.concurrency == b.concurrency
        and set(a.models) == set(b.models)
        and a.max_tokens == b.max_tokens
        and a.budgets == b.budgets
    )


def compile_documents(
    docs: Sequence[CheckedDoc],
    complete: bool,
    root: str,
    version: str,
    memo: RuleMemo | None = None,
) -> tuple[PolicyModel | None, SourceMap, list[Problem]]:
    """Compile schema-checked documents; the model is None whenever any problem was found.

    With a `memo`, compiled rules of documents unchanged since the memo's last compile (same
    objects, same destinations) are reused; the result is the same as without one."""
    c = _Compiler(docs, complete, root, memo)
    mesh = c.mesh()
    c.destination_models()
    agents, shadow_agents = c.agents()
    if memo is not None:
        memo.keep_only(c.memo_used)
    if c.problems or mesh is None or any(d.model is None for d in docs):
        return None, c.sources, c.problems
    model = PolicyModel(
        mesh=mesh,
        destinations=tuple(c.destinations[n] for n in sorted(c.destinations)),
        agents=tuple(agents),
        version=version,
        shadow_agents=tuple(shadow_agents),
    )
    return model, c.sources, []
