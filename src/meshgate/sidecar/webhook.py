"""The mutating admission webhook: AdmissionReview v1 in, a JSONPatch from `injector` out.

HTTPS only (the API server accepts nothing else). The decision is the pure `review()`; the
aiohttp server around it only moves bytes. A review that cannot be understood is answered with
an error, never with `allowed: true`: with `failurePolicy: Fail` the pod is then refused, which
is the safe outcome for a workload that asked for a proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from meshgate.errors import ConfigError
from meshgate.sidecar.injector import InjectError, InjectSettings, agent_of, patch_for

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
MAX_BODY = 3 * 1024 * 1024  # the API server's own object limit is ~1.5 MiB


def _answer(uid: str, allowed: bool, **extra: Any) -> dict[str, Any]:
    response = {"uid": uid, "allowed": allowed, **extra}
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _refuse(uid: str, message: str, code: int = 400) -> dict[str, Any]:
    return _answer(uid, False, status={"code": code, "message": message})


def review(body: bytes, settings: InjectSettings) -> tuple[int, dict[str, Any]]:
    """(HTTP status, AdmissionReview) for one request body.

    400 with an error review when there is no uid to answer to; once the uid is known, HTTP 200
    with `allowed: false` and a message, which the API server shows to whoever created the pod.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return 400, _refuse("", "request body is not JSON")
    if not isinstance(data, dict):
        return 400, _refuse("", "AdmissionReview must be a JSON object")
    if data.get("apiVersion") != API_VERSION or data.get("kind") != KIND:
        got = f"{data.get('apiVersion')}/{data.get('kind')}"
        return 400, _refuse("", f"expected {API_VERSION} {KIND}, got {got}")
    request = data.get("request")
    if not isinstance(request, dict):
        return 400, _refuse("", "AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return 400, _refuse("", "AdmissionReview request has no uid")
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("kind")) != ("", "Pod"):
        return 200, _answer(uid, True)  # only Pods are mutated; anything else passes unchanged
    pod = request.get("object")
    if not isinstance(pod, dict):
        return 200, _refuse(uid, "AdmissionReview request has no object (the Pod)")
    where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
    try:
        patch = patch_for(pod, settings)
    except InjectError as exc:
        log.warning("refused pod %s: %s", where, exc)
        return 200, _refuse(uid, f"meshgate: {exc}")
    if not patch:
        log.info("pod %s: nothing to inject (agent %s)", where, agent_of(pod) or "-")
        return 200, _answer(uid, True)
    log.info("pod %s: injected sidecar for agent %s", where, agent_of(pod))
    encoded = base64.b64encode(json.dumps(patch).encode()).decode()
    return 200, _answer(uid, True, patchType="JSONPatch", patch=encoded)


def _pod_name(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("name") or (meta.get("generateName") or "") + "*")


def make_app(settings: InjectSettings) -> web.Application:
    async def mutate(request: web.Request) -> web.Response:
        status, answer = review(await request.read(), settings)
        return web.json_response(answer, status=status)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context; a missing or mismatched file is one ConfigError line."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(ctx, cert, key)
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for path in (cert, key):
        if not path.is_file():
            what = "a directory, not a file" if path.is_dir() else "file not found"
            raise ConfigError(f"{path}: {what}")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{cert}, {key}: not a usable certificate and key ({exc})") from None


def _stamp(cert: Path, key: Path) -> tuple[float, float]:
    try:
        return cert.stat().st_mtime, key.stat().st_mtime
    except OSError:
        return 0.0, 0.0


class WebhookServer:
    """The HTTPS server on host:port, serving `/mutate` and `/healthz`.

    The certificate is re-read when its files change (cert-manager renews the Secret and the
    kubelet swaps the files): with `failurePolicy: Fail`, serving an expired certificate would
    stop every agent pod from being admitted.
    """

    def __init__(
        self,
        settings: InjectSettings,
        cert: Path,
        key: Path,
        host: str,
        port: int,
        reload_interval: float = 30.0,
    ) -> None:
        self.cert, self.key = cert, key
        self.tls = server_tls(cert, key)
        self._stamp = _stamp(cert, key)
        self.runner = web.AppRunner(make_app(settings), access_log=None)
        self.host = host
        self.port = port
        self.reload_interval = reload_interval
        self._reloader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.tls)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._reloader = asyncio.create_task(self._reload_loop())

    def reload_if_changed(self) -> bool:
        """Load the certificate again if its files changed; new handshakes use it. A bad new
        pair is logged and the current one kept."""
        stamp = _stamp(self.cert, self.key)
        if stamp == self._stamp:
            return False
        try:
            server_tls(self.cert, self.key)  # check the pair on a scratch context first
            _load_pair(self.tls, self.cert, self.key)
        except ConfigError as exc:
            log.warning("keeping the current certificate: %s", exc)
            return False
        self._stamp = stamp
        log.info("reloaded the serving certificate from %s", self.cert)
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.reload_if_changed()

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        await self.runner.cleanup()


async def serve_webhook(
    settings: InjectSettings, cert: Path, key: Path, host: str, port: int, stop: asyncio.Event
) -> None:
    server = WebhookServer(settings, cert, key, host, port)
    await server.start()
    log.info("meshgate injector listening on https://%s:%d/mutate", host, server.port)
    try:
        await stop.wait()
    finally:
        await server.stop()
