"""Ship the gateway's audit spool to the control plane: at least once, in order, durably.

Envoy appends one JSON line per request to the spool file, also while the control plane is
down (Envoy's own gRPC logger would drop those). This shipper, run by `meshgate gateway`, reads
complete lines after its checkpoint, sends them as one `StreamAccessLogs` stream, and advances
the checkpoint (inode + byte offset; fsync'd, atomic rename) only when the control plane has
answered, which it does after committing the batch. A crash between commit and checkpoint
resends the batch; the store skips the duplicates by request id.

Rotation: once everything up to `rotate_bytes` is shipped, the spool is renamed to `<spool>.1`
and Envoy is asked to reopen its logs (admin `/reopen_logs`, over its unix socket). The old file
is drained to its end once Envoy writes to the new one, then deleted. A spool shorter than the
checkpoint (truncated by hand) is read again from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as als
from envoy.service.accesslog.v3 import als_pb2

from meshgate.audit.ingest import IngestError, entry_from_spool
from meshgate.errors import ConfigError
from meshgate.retry import Backoff, Outage

if TYPE_CHECKING:
    from meshgate.sidecar.envoy_admin import EnvoyAdmin

log = logging.getLogger(__name__)

METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
ENTRIES_PER_MESSAGE = 200  # keeps each gRPC message far below the 4 MiB default limit
CHANNEL_OPTIONS = [  # reconnect promptly after a control-plane restart
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Checkpoint:
    inode: int  # 0: nothing shipped yet
    offset: int


def read_checkpoint(path: Path) -> Checkpoint:
    try:
        data = json.loads(path.read_text())
        return Checkpoint(int(data["inode"]), int(data["offset"]))
    except FileNotFoundError:
        return Checkpoint(0, 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # resending from the start is safe (the store dedupes); skipping would lose records
        log.warning("audit spool checkpoint %s unreadable (%s): shipping from the start", path, exc)
        return Checkpoint(0, 0)


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Durable before it is visible: write, fsync, rename over the old one, fsync the dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # beside the spool: as private
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"inode": checkpoint.inode, "offset": checkpoint.offset}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class SpoolShipper:
    def __init__(
        self,
        spool: Path,
        target: str,
        node_id: str,
        metadata: tuple[tuple[str, str], ...] = (),
        *,
        checkpoint: Path | None = None,
        envoy_admin: EnvoyAdmin | None = None,
        batch_bytes: int = 1 << 20,
        poll_interval: float = 0.2,
        rotate_bytes: int = 64 << 20,
        timeout: float = 30.0,
        refresh_metadata: Callable[[], tuple[tuple[str, str], ...]] | None = None,
        ca_file: str | None = None,
    ) -> None:
        """`target`: the control plane's xDS address HOST:PORT; `metadata`: gRPC metadata
        (the node's join token); `envoy_admin`: Envoy's admin (its unix socket), lets the
        shipper rotate the spool;
        `refresh_metadata`: a fresh token when the control plane says UNAUTHENTICATED (every
        batch is a new stream, so a token that expired since Envoy connected would stop it);
        `ca_file`: the control plane serves TLS, verified against this bundle."""
        self.spool = spool
        self.rotated = spool.with_name(spool.name + ".1")
        self.checkpoint_path = checkpoint or spool.with_name(spool.name + ".checkpoint")
        self.target = target
        self.node_id = node_id
        self.metadata = metadata
        self.envoy_admin = envoy_admin
        self.batch_bytes = batch_bytes
        self.poll_interval = poll_interval
        self.rotate_bytes = rotate_bytes
        self.timeout = timeout
        self.refresh_metadata = refresh_metadata
        self.ca_file = ca_file
        self.position = read_checkpoint(self.checkpoint_path)
        self.shipped = 0  # entries acknowledged by the control plane since start
        self.skipped = 0  # malformed lines
        self.rotations = 0  # spool renames since start (inode numbers get reused, so count)
        self._channel: grpc.aio.Channel | None = None

    async def run(self) -> None:
        """Ship until cancelled; retry with backoff (`meshgate.retry`, from `poll_interval` up
        to 5 s) while the control plane is unreachable, warning once per outage."""
        backoff = Backoff(self.poll_interval, max(self.poll_interval, 5.0))
        outage = Outage(log)

        async def refused(exc: BaseException, delay: float) -> None:
            assert isinstance(exc, grpc.aio.AioRpcError)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.refresh_metadata:
                with contextlib.suppress(Exception):
                    self.metadata = await asyncio.to_thread(self.refresh_metadata)
            outage.failed(
                "audit: control plane %s refused or unreachable (%s: %s); spooling",
                self.target,
                exc.code().name,
                exc.details(),
            )

        try:
            while True:
                try:
                    sent = await backoff.until_success(
                        self.ship_once, refused, retry_on=(grpc.aio.AioRpcError,)
                    )
                except OSError as exc:
                    log.error("audit: spool %s: %s", self.spool, exc)
                    await asyncio.sleep(5.0)
                    continue
                except Exception as exc:  # never stop shipping for good: the spool only grows
                    log.error("audit: shipping %s failed: %s; retrying", self.spool, exc)
                    await self.close()
                    await asyncio.sleep(5.0)
                    continue
                outage.recovered("audit: shipping to %s again", self.target)
                if sent is None:  # nothing new
                    await asyncio.sleep(self.poll_interval)
        finally:
            await self.close()

    async def drain(self, timeout: float = 5.0) -> None:
        """Ship what is in the spool now (at shutdown); what remains goes on the next start."""
        with contextlib.suppress(grpc.aio.AioRpcError, OSError, TimeoutError):
            async with asyncio.timeout(timeout):
                while await self.ship_once() is not None:
                    pass

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    def _open_channel(self) -> grpc.aio.Channel:
        if self.ca_file is None:
            return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            roots = Path(self.ca_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{self.ca_file}: cannot read xDS CA bundle ({exc.strerror})"
            ) from None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)

    async def ship_once(self) -> int | None:
        """Ship one batch; the number of lines it covered, or None when there was nothing."""
        current = _inode(self.spool)
        pos = self.position
        if pos.inode and pos.inode != current:
            return await self._drain_rotated(current)
        if current is None:
            return None
        if not pos.inode:
            pos = self.position = Checkpoint(current, 0)
        size = os.stat(self.spool).st_size
        if size < pos.offset:
            log.warning("audit: spool %s shrank below the checkpoint; reading it again", self.spool)
            pos = self.position = Checkpoint(current, 0)
        if size == pos.offset:
            await self._maybe_rotate(size)
            return None
        return await self._ship_from(self.spool, pos)

    async def _drain_rotated(self, current: int | None) -> int | None:
        """The checkpoint names a file that is no longer the spool: finish it first."""
        pos = self.position
        if _inode(self.rotated) == pos.inode:
            lines = await self._ship_from(self.rotated, pos)
            if lines is not None:
                return lines
            if current is None:  # Envoy has not reopened yet: the old file may still grow
                await self._reopen_logs()
                return None
            self.rotated.unlink()
        elif current is None:
            return None
        else:
            log.warning("audit: spool file %s was replaced; shipping the new one", self.spool)
        assert current is not None
        self.position = Checkpoint(current, 0)
        write_checkpoint(self.checkpoint_path, self.position)
        return 0

    async def _ship_from(self, path: Path, pos: Checkpoint) -> int | None:
        with open(path, "rb") as fh:
            fh.seek(pos.offset)
            chunk = fh.read(self.batch_bytes)
        end = chunk.rfind(b"\n")
        if end < 0:
            if len(chunk) >= self.batch_bytes:  # one line longer than a batch: not ours
                raise OSError(f"line at offset {pos.offset} longer than {self.batch_bytes} bytes")
            return None  # a partial line: Envoy has not finished writing it
        lines = chunk[: end + 1].splitlines()
        entries: list[als.HTTPAccessLogEntry] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                entries.append(entry_from_spool(line))
            except IngestError as exc:
                self.skipped += 1
                log.warning("audit: skipping a malformed spool line: %s", exc)
        if entries:
            await self._send(entries)
        self.position = Checkpoint(pos.inode, pos.offset + end + 1)
        write_checkpoint(self.checkpoint_path, self.position)
        self.shipped += len(entries)
        return len(lines)

    def _messages(
        self, entries: list[als.HTTPAccessLogEntry]
    ) -> Iterator[als_pb2.StreamAccessLogsMessage]:
        for i in range(0, len(entries), ENTRIES_PER_MESSAGE):
            message = als_pb2.StreamAccessLogsMessage()
            if i == 0:
                message.identifier.node.id = self.node_id
                message.identifier.log_name = "meshgate-spool"
            message.http_logs.log_entry.extend(entries[i : i + ENTRIES_PER_MESSAGE])
            yield message

    async def _send(self, entries: list[als.HTTPAccessLogEntry]) -> None:
        """Returns once the control plane has committed them (its response), else raises."""
        if self._channel is None:
            self._channel = self._open_channel()
        call = self._channel.stream_unary(
            METHOD,
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        await call(self._messages(entries), metadata=self.metadata or None, timeout=self.timeout)

    async def _maybe_rotate(self, size: int) -> None:
        if size < self.rotate_bytes or self.envoy_admin is None or self.rotated.exists():
            return
        os.replace(self.spool, self.rotated)
        self.rotations += 1
        log.info("audit: rotated %s (%d bytes shipped)", self.spool, size)
        await self._reopen_logs()

    async def _reopen_logs(self) -> None:
        if self.envoy_admin is None:
            return
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            await self.envoy_admin.arequest("POST", "/reopen_logs")
