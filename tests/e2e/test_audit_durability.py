"""No audit record is lost or doubled when the control plane is SIGKILLed under load.

The control plane is a real `meshgate serve` subprocess; the gateway is what `meshgate gateway`
runs (Envoy in its state directory writing the spool, plus the shipper). 10,000 requests go
through while the control plane is killed and restarted on the same ports; afterwards the store
holds exactly one record per request id that the agent saw.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from builders import free_port
from harness import until, upstream, write_policy

from meshgate.audit.open import open_store
from meshgate.audit.store import AuditQuery
from meshgate.sidecar.launcher import prepare_gateway

pytestmark = pytest.mark.e2e

SRC = Path(__file__).resolve().parents[2] / "src"
REQUESTS = 10_000
CONCURRENCY = 50
KILL_AFTER = 3_000  # responses before the SIGKILL
DOWN_SECONDS = 2.0  # traffic keeps flowing through the gateway meanwhile


def start_control_plane(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "meshgate.cli", "serve", *args],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )


async def wait_ready(admin: str, timeout: float = 30) -> None:
    async def ready() -> bool:
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(f"http://{admin}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    await until(ready, timeout, f"control plane at {admin}", interval=0.1)


def stored_ids(db: Path) -> list[str]:
    store = open_store(db)
    try:
        ids: list[str] = []
        cursor = None
        while True:
            page = store.query(AuditQuery(limit=10_000, cursor=cursor))
            ids.extend(r.request_id for r in page.records)
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor
    finally:
        store.close()


async def test_sigkill_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    listen, xds, admin = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    db = state / "audit.db"
    async with upstream("tools") as up:
        write_policy(tmp_path / "policies", listen, {"tools": up.port})
        args = [
            "--policies", str(tmp_path / "policies"),
            "--state-dir", str(state),
            "--xds-port", str(xds),
            "--admin-port", str(admin),
            "--gateway-bind", "127.0.0.1",
            "--insecure",  # requests go to the gateway directly, without a client certificate
        ]  # fmt: skip
        cp = start_control_plane(args, tmp_path / "cp.log")
        gw = None
        try:
            await wait_ready(f"127.0.0.1:{admin}")
            # the launcher mints the gateway's join token from the state dir, as on one host
            gw = prepare_gateway("e2e", f"127.0.0.1:{xds}", state, None, insecure=True)
            await gw.start()
            await gw.wait_ready()

            seen: list[str] = []
            statuses: dict[int, int] = {}
            done = 0
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            headers = {"Host": "tools.internal", "x-meshgate-agent": "researcher"}
            async with aiohttp.ClientSession(connector=connector) as session:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(REQUESTS):
                    queue.put_nowait(i)

                async def worker() -> None:
                    nonlocal done
                    while not queue.empty():
                        i = queue.get_nowait()
                        # a client-chosen id must not become the audit key
                        sent = {**headers, "x-request-id": f"chosen-{i % 7}"}
                        url = f"http://127.0.0.1:{listen}/r/{i}"
                        async with session.get(url, headers=sent) as resp:
                            await resp.read()
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1
                            seen.append(resp.headers["x-request-id"])
                        done += 1

                async def chaos() -> None:
                    nonlocal cp
                    await until(lambda: done >= KILL_AFTER, 60, "traffic before the kill")
                    os.killpg(cp.pid, signal.SIGKILL)
                    cp.wait()
                    killed_at = done
                    await asyncio.sleep(DOWN_SECONDS)
                    assert done > killed_at, (
                        "the gateway must keep serving without its control plane"
                    )
                    cp = start_control_plane(args, tmp_path / "cp.log")
                    await wait_ready(f"127.0.0.1:{admin}")

                started = time.monotonic()
                await asyncio.gather(chaos(), *(worker() for _ in range(CONCURRENCY)))
                elapsed = time.monotonic() - started
            assert statuses == {200: REQUESTS}, statuses
            assert len(set(seen)) == REQUESTS
            assert not any(rid.startswith("chosen-") for rid in seen)

            def all_stored() -> bool:
                return len(stored_ids(db)) >= REQUESTS

            await until(all_stored, timeout=60, what="every record stored", interval=0.5)
            ids = stored_ids(db)
            assert len(ids) == len(set(ids)) == REQUESTS
            assert set(ids) == set(seen)
            print(f"{REQUESTS} requests in {elapsed:.1f}s with a SIGKILL; all {len(ids)} stored")
        finally:
            if gw is not None:
                await gw.stop()
            if cp.poll() is None:
                cp.terminate()
                try:
                    cp.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(cp.pid, signal.SIGKILL)
                    cp.wait()
