"""The SubAgentStore contract, one body for both stores: the file store (the embedded default)
and PostgreSQL (shared by control-plane replicas). Then what only a shared store can promise:
two registries on one database see each other's sub-agents, and their concurrent creates keep
`maxSubAgents` and child names unique."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from delegation_stores import pg_schema

from meshgate.delegation.expand import SubAgent
from meshgate.delegation.registry import DelegationRegistry, Request
from meshgate.delegation.rights import DelegationError, RuleGrant
from meshgate.delegation.stores import FileStore, SubAgentStore, open_store
from meshgate.errors import ConfigError
from meshgate.policy.model import (
    AgentPolicy,
    Delegation,
    Destination,
    EgressRule,
    Mesh,
    PolicyModel,
)

Opener = Callable[[], SubAgentStore]
NOW = 1_000_000


@pytest.fixture(params=["file", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens another instance on the same storage (a restart, or another replica)."""
    opened: list[SubAgentStore] = []

    def tracked(make: Callable[[], SubAgentStore]) -> Opener:
        def open_one() -> SubAgentStore:
            store = make()
            opened.append(store)
            return store

        return open_one

    try:
        if request.param == "file":
            yield tracked(lambda: open_store("", tmp_path))
        else:
            with pg_schema() as url:
                yield tracked(lambda: open_store(url, tmp_path))
    finally:
        for store in opened:
            store.close()


def sub(name: str, created: int = NOW, ttl: int = 300, **kw: object) -> SubAgent:
    return SubAgent(
        name,
        (RuleGrant(0, ("GET",), ("/a/*",), ()), RuleGrant(2)),
        ("f0", "f2"),
        created,
        created + ttl,
        **kw,  # type: ignore[arg-type]
    )


def adding(new: SubAgent, limit: int = 10) -> Callable[..., SubAgent]:
    def make(children: list[SubAgent], own: SubAgent | None) -> SubAgent:
        if len(children) >= limit:
            raise DelegationError(f"maxSubAgents is {limit}")
        return new

    return make


def test_round_trip_and_restart(opener: Opener) -> None:
    store = opener()
    # the join token's id is stored with the sub-agent when it is created
    a = sub("sup.a", delegation=Delegation(1, 60), token_id="tok-1")
    assert store.add("sup", adding(a)) == a
    store.add("sup", adding(sub("sup.b")))
    store.add("sup.a", adding(sub("sup.a.deep", ttl=60)))
    again = opener()  # a restart, or another replica
    held = {s.name: s for s in again.load()}
    assert set(held) == {"sup.a", "sup.b", "sup.a.deep"}
    assert held["sup.a"].token_id == "tok-1"
    assert held["sup.a"].delegation == Delegation(1, 60)
    assert held["sup.a"].grants == a.grants and held["sup.a"].fingerprints == a.fingerprints
    assert (held["sup.a"].created_at, held["sup.a"].expires_at) == (NOW, NOW + 300)
    assert again.gateway_key() == store.gateway_key() and len(store.gateway_key()) == 64


def test_add_sees_the_parents_children_and_own_record(opener: Opener) -> None:
    store = opener()
    for parent, name in (("sup", "sup.a"), ("sup", "sup.b"), ("other", "other.x")):
        store.add(parent, adding(sub(name)))
    seen: list[tuple[list[str], str | None]] = []

    def observe(name: str) -> Callable[..., SubAgent]:
        def make(children: list[SubAgent], own: SubAgent | None) -> SubAgent:
            seen.append((sorted(c.name for c in children), own.name if own else None))
            return sub(name)

        return make

    store.add("sup", observe("sup.c"))
    store.add("sup.a", observe("sup.a.deep"))
    assert seen == [(["sup.a", "sup.b"], None), ([], "sup.a")]


def test_refusals_store_nothing(opener: Opener) -> None:
    store = opener()
    store.add("sup", adding(sub("sup.a")))
    with pytest.raises(DelegationError, match="exists already"):
        store.add("sup", adding(sub("sup.a", created=NOW + 1)))
    with pytest.raises(DelegationError, match="maxSubAgents is 1"):
        store.add("sup", adding(sub("sup.b"), limit=1))
    assert [s.name for s in opener().load()] == ["sup.a"]


def test_remove_tree_and_discard(opener: Opener) -> None:
    store = opener()
    for s in (sub("sup.a"), sub("sup.ab"), sub("sup.b")):
        store.add("sup", adding(s))
    store.add("sup.a", adding(sub("sup.a.x")))
    gone = store.remove_tree("sup.a")
    assert sorted(s.name for s in gone) == ["sup.a", "sup.a.x"]  # not sup.ab
    assert store.remove_tree("sup.a") == []
    # discard removes exactly that delegation: not a later one under the same name
    old_b = next(s for s in store.load() if s.name == "sup.b")
    store.remove_tree("sup.b")
    store.add("sup", adding(sub("sup.b", created=NOW + 5)))
    store.discard([old_b])
    assert sorted((s.name, s.created_at) for s in opener().load()) == [
        ("sup.ab", NOW),
        ("sup.b", NOW + 5),
    ]
    store.discard([s for s in store.load()])
    assert opener().load() == []


# -- the registry over either store ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


MODEL = PolicyModel(
    Mesh(trust_domain="agents.test"),
    (Destination("alpha", "alpha.internal", 80),),
    (AgentPolicy("sup", "sup", (EgressRule("alpha"),), delegation=Delegation(2, 600)),),
    "v1",
)


def ask(name: str, ttl: int = 300) -> Request:
    return Request(name, ttl, (RuleGrant(0, methods=("GET",)),))


def replica(opener: Opener, first: DelegationRegistry) -> SubAgentStore:
    """Another replica's store; the file store is one process's, so it is shared as is."""
    return first.store if isinstance(first.store, FileStore) else opener()


def test_registries_on_one_store_see_each_others_sub_agents(opener: Opener) -> None:
    clock = Clock()
    a = DelegationRegistry(opener(), clock)
    b = DelegationRegistry(replica(opener, a), clock)
    a.create("sup", ask("web-1", 60), MODEL)
    assert b.refresh() is True  # the refresh thread's read, every second
    assert [s.name for s in b.current(MODEL)] == ["sup.web-1"]
    assert [s.name for s in b.children("sup")] == ["sup.web-1"]
    assert b.key == a.key
    with pytest.raises(DelegationError, match="exists already"):
        b.create("sup", ask("web-1"), MODEL)
    b.create("sup", ask("web-2"), MODEL)
    with pytest.raises(DelegationError, match="maxSubAgents is 2"):
        a.create("sup", ask("web-3"), MODEL)
    # revoked through b: gone for a too
    assert [s.name for s in b.delete("sup", "web-1")] == ["sup.web-1"]
    a.refresh()
    assert [s.name for s in a.current(MODEL)] == ["sup.web-2"]
    # expired: dropped for everyone, by whichever reads first
    clock.now += 301
    b.refresh()  # the refresh thread reads every second (the clock jumped)
    assert b.current(MODEL) == ()
    b.refresh()
    a.refresh()
    assert a.store.load() == [] and a.current(MODEL) == () and a.all() == []


def test_an_expired_sub_agent_does_not_count_against_max(opener: Opener) -> None:
    clock = Clock()
    reg = DelegationRegistry(opener(), clock)
    reg.create("sup", ask("one", 10), MODEL)
    reg.create("sup", ask("two", 10), MODEL)
    clock.now += 11  # not yet dropped by a read of `current`
    reg.create("sup", ask("three", 10), MODEL)


def test_a_policy_another_replica_does_not_serve_yet_drops_nothing_for_good(
    opener: Opener,
) -> None:
    """Replica B still serves a policy without `delegation` while A serves the new one: B
    leaves A's sub-agent out, but does not delete it; once B serves the new policy too, B
    serves it."""
    clock = Clock()
    plain = AgentPolicy("sup", "sup", (EgressRule("alpha"),))
    old = PolicyModel(MODEL.mesh, MODEL.destinations, (plain,), "v0")
    a = DelegationRegistry(opener(), clock)
    b = DelegationRegistry(replica(opener, a), clock)
    assert b.current(old) == ()  # b has served v0 since NOW
    clock.now += 5
    a.current(MODEL)
    a.create("sup", ask("web-1"), MODEL)
    b.refresh()
    assert b.current(old) == ()
    b.refresh()
    assert [s.name for s in a.store.load()] == ["sup.web-1"]
    assert [s.name for s in b.current(MODEL)] == ["sup.web-1"]


# -- concurrency: two registries, one database -------------------------------------------------


def race(opener: Opener, names: list[str], shared: bool) -> tuple[list[str], list[str]]:
    """Create `names` at once from threads, alternating between two registries."""
    clock = Clock()
    first = DelegationRegistry(opener(), clock)
    second = DelegationRegistry(opener(), clock) if shared else first
    registries = [first, second]
    start = threading.Barrier(len(names))
    made: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        start.wait()
        try:
            sub_agent = registries[i % 2].create("sup", ask(names[i]), MODEL)
        except DelegationError as exc:
            with lock:
                refused.append(str(exc))
        else:
            with lock:
                made.append(sub_agent.name)

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(create, range(len(names))))
    stored = sorted(s.name for s in opener().load())
    assert sorted(made) == stored
    return made, refused


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_creates_keep_max_sub_agents(opener: Opener, attempt: int) -> None:
    shared = not isinstance(opener(), FileStore)
    made, refused = race(opener, [f"w{i}" for i in range(8)], shared)
    assert len(made) == 2, (made, refused)
    assert len(refused) == 6 and all("maxSubAgents is 2" in r for r in refused)


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_creates_of_one_name_make_one(opener: Opener, attempt: int) -> None:
    shared = not isinstance(opener(), FileStore)
    made, refused = race(opener, ["same"] * 6, shared)
    assert made == ["sup.same"], (made, refused)
    assert all("exists already" in r for r in refused)


def test_a_bad_store_url_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use postgresql://"):
        open_store("redis://:secret@db:6379/0", tmp_path)
    with pytest.raises(ConfigError, match="cannot connect to the delegation store") as info:
        open_store("postgresql://meshgate:hunter2@127.0.0.1:1/none?connect_timeout=2", tmp_path)
    assert "hunter2" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not a plain SQL identifier"):
        open_store("postgresql://127.0.0.1:1/x?schema=a;drop", tmp_path)


def test_add_is_atomic_even_when_deciding_is_slow(opener: Opener) -> None:
    """`make` sleeps between reading the children and the insert: every other add (from
    another replica's store too) must wait for it, or both would see room for one more."""
    stores = [opener(), opener()] if not isinstance(opener(), FileStore) else [opener()] * 2
    start = threading.Barrier(6)

    def slow(name: str) -> Callable[..., SubAgent]:
        def make(children: list[SubAgent], own: SubAgent | None) -> SubAgent:
            if len(children) >= 2:
                raise DelegationError("maxSubAgents is 2")
            time.sleep(0.05)
            return sub(name)

        return make

    def add(i: int) -> str:
        start.wait()
        try:
            return stores[i % 2].add("sup", slow(f"sup.w{i}")).name
        except DelegationError as exc:
            return str(exc)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(add, range(6)))
    made = [r for r in results if r.startswith("sup.")]
    assert len(made) == 2 and sorted(made) == sorted(s.name for s in opener().load()), results


# -- PostgreSQL only: what a shared database adds ----------------------------------------------


def test_postgres_reconnects_after_the_server_drops_its_connections(tmp_path: Path) -> None:
    import psycopg

    with pg_schema() as url:
        store = open_store(url, tmp_path)
        other = open_store(url, tmp_path)
        try:
            store.add("sup", adding(sub("sup.a")))
            # a server restart, as the store's idle connections see it (only theirs: the
            # database is shared with other tests)
            pids = [c.info.backend_pid for c in list(store._idle.queue)]  # type: ignore[attr-defined]
            assert pids
            with psycopg.connect(url.partition("?")[0], autocommit=True) as admin:
                for pid in pids:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert [s.name for s in store.load()] == ["sup.a"]
            store.add("sup", adding(sub("sup.b")))
            assert sorted(s.name for s in other.load()) == ["sup.a", "sup.b"]
        finally:
            store.close()
            other.close()


def test_postgres_ignores_an_unreadable_row_not_the_others(tmp_path: Path) -> None:
    import psycopg

    with pg_schema() as url:
        store = open_store(url, tmp_path)
        try:
            store.add("sup", adding(sub("sup.a")))
            schema = url.rpartition("schema=")[2]
            with psycopg.connect(url.partition("?")[0], autocommit=True) as admin:
                admin.execute(
                    f'INSERT INTO "{schema}".delegation_sub_agents '
                    "(name, parent, created_at, expires_at, doc) "
                    "VALUES ('sup.bad', 'sup', 1, 2, '{\"name\": 3}')"
                )
            assert [s.name for s in store.load()] == ["sup.a"]
        finally:
            store.close()


def test_a_create_racing_the_parents_delete_leaves_no_orphan(opener: Opener) -> None:
    """Replica A's `add` reads parent `sup.w`, replica B deletes `sup.w` and its subtree while
    A decides, then the supervisor re-creates `sup.w`: A's child must not be left behind for
    the new `sup.w` to inherit (its rights and its maxSubAgents)."""
    first = opener()
    other = first if isinstance(first, FileStore) else opener()
    first.add("sup", adding(sub("sup.w", delegation=Delegation(1, 60))))
    deciding = threading.Event()

    def slow(children: list[SubAgent], own: SubAgent | None) -> SubAgent:
        assert own is not None  # the parent, as A read it
        deciding.set()
        time.sleep(0.5)
        return sub("sup.w.x", ttl=60)

    with ThreadPoolExecutor(1) as pool:
        creating = pool.submit(first.add, "sup.w", slow)
        assert deciding.wait(5)
        other.remove_tree("sup.w")
        creating.result(timeout=10)  # it held the parent: the delete waited, then took it too
    first.add("sup", adding(sub("sup.w", created=NOW + 5, delegation=Delegation(1, 60))))
    assert sorted(s.name for s in opener().load()) == ["sup.w"]
