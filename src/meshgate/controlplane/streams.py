"""One ADS stream: the I/O shell around the pure rules in `meshgate.xds.protocol`.

Two tasks per stream: a reader, which applies each request to the stream's state as it
arrives, and a writer (the gRPC handler's own task), which hands queued responses to gRPC one at
a time, as a call allows. Deciding what to send never waits: the rules run synchronously and
queue the response bytes, so the state is only ever changed between awaits, in the loop's
thread; no locks. A snapshot change does not wake the stream directly: the cache asks the shared
`Pusher` (controlplane/push_queue.py), which bounds how many streams push at once; a push queues
its responses at once, and its slot is freed when the writer has handed them to gRPC. So a push
costs no task, and an ACK no hop between tasks. A response is assembled from bytes the snapshot
serialised once.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from envoy.service.discovery.v3 import discovery_pb2
from grpc.aio import EOF  # type: ignore[attr-defined]  # (missing from grpc-stubs)

from meshgate.controlplane.cache import SnapshotCache
from meshgate.controlplane.push_queue import Pusher
from meshgate.controlplane.registry import NodeConnection, NodeRegistry
from meshgate.xds import types
from meshgate.xds.nodes import NodeRole, parse_node_id
from meshgate.xds.protocol import (
    Kind,
    TypeState,
    acknowledge,
    apply_delta_subscription,
    classify,
    plan_delta,
    should_push,
    sotw_names,
)
from meshgate.xds.snapshot import Snapshot
from meshgate.xds.wire import length_delimited, string_field

log = logging.getLogger(__name__)

_stream_ids = itertools.count(1)
_PUSHED = object()  # in the outbox after a push's responses: the push is handed over there
_CLOSED = object()

# How long a push may hold one of the Pusher's slots. A stream whose client does not read (flow
# control holds the send) must not keep the others waiting; it still gets its push, later.
PUSH_SLOT_TIMEOUT = 5.0

# A change that touches at most this many node groups is pushed before bulk changes.
SMALL_CHANGE_GROUPS = 8


class StreamError(Exception):
    """Ends one stream with a gRPC status; other streams are unaffected."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class Authenticator(Protocol):
    def __call__(self, node_id: str, metadata: dict[str, str], peer: str) -> str:
        """Return the verified identity for this node or raise StreamError."""


def allow_all(node_id: str, metadata: dict[str, str], peer: str) -> str:
    return node_id


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest


class Mailbox:
    """A stream's outbox (responses and markers, one reader): what `asyncio.Queue` does here,
    with a deque and at most one waiter. Every connected stream keeps one, and 10,000 queues'
    four deques and an event each were objects every full collection scanned. The loop is
    looked up once: `asyncio.get_running_loop()` costs a getpid() system call each time."""

    __slots__ = ("_loop", "_waiter", "items")

    def __init__(self) -> None:
        self.items: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put_nowait(self, item: object) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return once an item is there."""
        while not self.items:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self) -> object:
        if not self.items:
            await self.wait()
        return self.items.popleft()


class AdsStream(abc.ABC):
    """State and loops common to SotW and delta streams."""

    protocol = ""

    def __init__(
        self,
        cache: SnapshotCache,
        registry: NodeRegistry,
        send: Callable[[bytes], Awaitable[None]],
        peer: str,
        metadata: dict[str, str],
        authenticate: Authenticator,
        pusher: Pusher[AdsStream],
        sent: collections.Counter[str] | None = None,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self._write = send
        self.peer = peer
        self.metadata = metadata
        self.authenticate = authenticate
        # identities that can lapse while connected (sub-agents'): controlplane/auth.py
        self._still_valid: Callable[[str, dict[str, str]], None] | None = getattr(
            authenticate, "recheck", None
        )
        self.pusher = pusher
        self.sent: collections.Counter[str] = collections.Counter() if sent is None else sent
        self.stream_id = next(_stream_ids)
        self.conn: NodeConnection | None = None
        self.outbox = Mailbox()
        self._pushes = 0  # pushes whose responses the writer has not handed over yet
        self._closed = False
        self._nonces = itertools.count(1)
        self._cancel_watch: Callable[[], None] | None = None

    def __repr__(self) -> str:  # in the Pusher's log lines
        node = self.conn.node_id if self.conn is not None else "?"
        return f"stream {self.stream_id} ({node})"

    async def run(self, read: Callable[[], Awaitable[Any]]) -> None:
        """The writer: hand queued responses to gRPC, in order, until the stream ends.
        `read` is the call's `read()`: the next request, or `grpc.aio.EOF`."""
        reader = asyncio.create_task(self._read(read))
        outbox = self.outbox
        items = outbox.items
        write = self._write
        try:
            while True:
                if not items:
                    await outbox.wait()
                item = items.popleft()
                if type(item) is bytes:
                    await write(item)
                elif item is _PUSHED:
                    self._pushes -= 1
                    if not self._pushes:
                        self.pusher.done(self)
                elif item is _CLOSED:
                    return
                else:
                    assert isinstance(item, BaseException)
                    raise item
        finally:
            self._closed = True
            reader.cancel()
            if self._cancel_watch is not None:
                self._cancel_watch()
            self.pusher.discard(self)
            if self._pushes:
                self._pushes = 0
                self.pusher.done(self)
            self.registry.remove(self.stream_id)

    async def _read(self, read: Callable[[], Awaitable[Any]]) -> None:
        """The reader: apply each request as it comes; an error ends the stream (via the
        writer, after the responses queued before it). It calls `read()` itself rather than
        iterating the call's request iterator: one async generator step less per ACK."""
        try:
            while (request := await read()) is not EOF:
                try:
                    if self.conn is None:
                        await self._connect(request)
                    self._on_request(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.outbox.put_nowait(exc)
                    return
            self.outbox.put_nowait(_CLOSED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a client that sends garbage ends only its own stream
            self.outbox.put_nowait(StreamError("INVALID_ARGUMENT", f"bad request: {exc}"))

    def _wake(self, groups_changed: int) -> None:
        """The group's snapshot changed: ask for a push slot, ahead of bulk changes if this
        change is small (one agent's, and the gateways')."""
        if not self._closed:
            self.pusher.request(self, urgent=groups_changed <= SMALL_CHANGE_GROUPS)

    def push(self) -> None:
        """Run by the Pusher in a slot: queue what the current snapshot calls for; the slot is
        freed (`Pusher.done`) once the writer has handed it to gRPC, at once if nothing."""
        if self._closed:
            self.pusher.done(self)
            return
        queued = len(self.outbox.items)
        try:
            self._recheck()
            self.on_snapshot()
        except Exception as exc:  # ends this stream only
            self.outbox.put_nowait(exc)
        if len(self.outbox.items) == queued and not self._pushes:
            self.pusher.done(self)
            return
        self._pushes += 1
        self.outbox.put_nowait(_PUSHED)

    def send(self, type_url: str, body: bytes) -> None:
        """Queue a response for the writer."""
        self.sent[type_url] += 1
        self.outbox.put_nowait(body)

    def _recheck(self) -> None:
        """An identity that can lapse while its stream is open (a deleted sub-agent's, whose
        name a later delegation may take): StreamError before anything more is sent. The
        authenticator's optional `recheck` (no I/O)."""
        if self._still_valid is not None and self.conn is not None:
            self._still_valid(self.conn.identity, self.metadata)

    def _on_request(self, request: Any) -> None:
        self._recheck()
        type_url = request.type_url
        if type_url not in types.TYPE_ORDER:
            raise StreamError("INVALID_ARGUMENT", f"unsupported type_url {type_url!r}")
        self.on_request(request)

    async def _connect(self, request: Any) -> None:
        node_id = request.node.id if request.HasField("node") else ""
        if not node_id:
            raise StreamError("INVALID_ARGUMENT", "the first request must carry node.id")
        try:
            role: NodeRole = parse_node_id(node_id)
        except ValueError as exc:
            raise StreamError("INVALID_ARGUMENT", str(exc)) from None
        if self.authenticate is allow_all:
            identity = allow_all(node_id, self.metadata, self.peer)
        else:  # a token check may read the revocation list: not on the loop
            identity = await asyncio.to_thread(self.authenticate, node_id, self.metadata, self.peer)
        build = request.node.user_agent_build_version.version
        envoy_version = (
            f"{build.major_number}.{build.minor_number}.{build.patch}"
            if request.node.HasField("user_agent_build_version")
            else request.node.user_agent_name
        )
        group = role.group
        self.conn = NodeConnection(
            self.stream_id,
            node_id,
            role,
            self.protocol,
            self.peer,
            identity,
            envoy_version,
            current=functools.partial(self.cache.serving, group),
        )
        self.registry.add(self.conn)
        self._cancel_watch = self.cache.watch(role.group, self._wake)
        log.info("node %s connected (%s, %s)", node_id, self.protocol, self.peer)

    def snapshot(self) -> Snapshot | None:
        assert self.conn is not None
        return self.cache.get(self.conn.role.group)

    def state(self, type_url: str) -> TypeState:
        assert self.conn is not None
        st = self.conn.types.get(type_url)
        if st is None:
            st = self.conn.types[type_url] = TypeState(type_url)
        return st

    def next_nonce(self) -> str:
        return f"{self.stream_id}-{next(self._nonces)}"

    def record_nack(self, st: TypeState, message: str) -> None:
        assert self.conn is not None
        version = st.version_sent or ""
        st.rejected_version = version
        st.last_error = message
        self.registry.record_nack(self.conn, st.type_url, version, message)
        log.warning(
            "node %s rejected %s version %s: %s",
            self.conn.node_id,
            types.SHORT_NAMES.get(st.type_url),
            version,
            message,
        )

    @abc.abstractmethod
    def on_request(self, request: Any) -> None: ...

    @abc.abstractmethod
    def on_snapshot(self) -> None: ...


class SotwStream(AdsStream):
    """State-of-the-world ADS: full state per type, one response in flight per type."""

    protocol = "sotw"

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        st = self.state(request.type_url)
        kind = classify(st, request.response_nonce, request.HasField("error_detail"))
        if kind is Kind.STALE:
            return
        names = sotw_names(request.type_url, list(request.resource_names))
        if kind is Kind.NEW:
            st.names = names
            st.in_flight = False
            st.nonce_sent = None
            if request.version_info:
                st.version_acked = request.version_info
            self._respond(st, self.snapshot())
            return
        st.in_flight = False
        if kind is Kind.NACK:
            self.record_nack(st, request.error_detail.message)
        else:
            acknowledge(st, request.version_info)
        snap = self.snapshot()
        if names != st.names:
            st.names = names
            self._respond(st, snap)
        elif snap is not None and should_push(st, snap.version(st.type_url)):
            self._respond(st, snap)

    def on_snapshot(self) -> None:
        assert self.conn is not None
        subscribed = self.conn.types
        snap = self.snapshot()  # once per push, not per type
        if snap is None:
            return
        for type_url in types.TYPE_ORDER:
            st = subscribed.get(type_url)
            if st is None:
                continue
            # never sent (subscribed before its group had a snapshot), or a new version
            if st.nonce_sent is None or should_push(st, snap.version(type_url)):
                self._respond(st, snap)

    def _respond(self, st: TypeState, snap: Snapshot | None) -> None:
        if snap is None:  # nothing for this group yet: the first snapshot will wake us
            st.nonce_sent = None
            return
        nonce = self.next_nonce()
        body = snap.sotw_body(st.type_url, st.names)
        st.nonce_sent = nonce
        st.version_sent = snap.version(st.type_url)
        st.in_flight = True
        self.send(st.type_url, body + string_field(5, nonce))


class DeltaStream(AdsStream):
    """Incremental ADS: only changed resources are sent, removals named explicitly."""

    protocol = "delta"

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        assert self.conn is not None
        first = request.type_url not in self.conn.types
        st = self.state(request.type_url)
        if first:
            st.client_versions = dict(request.initial_resource_versions)
        apply_delta_subscription(
            st,
            list(request.resource_names_subscribe),
            list(request.resource_names_unsubscribe),
            first,
        )
        changed_subscription = bool(
            request.resource_names_subscribe or request.resource_names_unsubscribe
        )
        kind = classify(st, request.response_nonce, request.HasField("error_detail"))
        if kind is Kind.ACK:
            st.in_flight = False
            acknowledge(st, st.version_sent)
        elif kind is Kind.NACK:
            st.in_flight = False
            self.record_nack(st, request.error_detail.message)
        self._respond(st, force=first or changed_subscription)

    def on_snapshot(self) -> None:
        assert self.conn is not None
        snap = self.snapshot()
        if snap is None:
            return
        for type_url in types.TYPE_ORDER:
            st = self.conn.types.get(type_url)
            if st is None or st.in_flight:
                continue
            if st.nonce_sent is not None and st.version_sent == snap.version(type_url):
                continue  # planned against this very content already: nothing to diff
            self._respond(st, force=st.nonce_sent is None)

    def _respond(self, st: TypeState, force: bool) -> None:
        snap = self.snapshot()
        if snap is None:
            return
        if st.in_flight and not force:
            return
        resources = snap.of_type(st.type_url)
        plan = plan_delta(st, {name: res.version for name, res in resources.items()})
        if plan.empty and not force:
            return
        nonce = self.next_nonce()
        parts = [string_field(1, snap.version(st.type_url))]
        for name in plan.updated:
            parts.append(length_delimited(2, resources[name].delta_bytes))
            st.client_versions[name] = resources[name].version
        parts.append(string_field(4, st.type_url))
        parts.append(string_field(5, nonce))
        for name in plan.removed:
            parts.append(string_field(6, name))
            st.client_versions.pop(name, None)
        st.nonce_sent = nonce
        st.version_sent = snap.version(st.type_url)
        st.in_flight = True
        self.send(st.type_url, b"".join(parts))
