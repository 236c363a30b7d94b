"""The admission webhook: AdmissionReview v1 answers, refusals of malformed reviews, real HTTPS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import free_port, write_test_pki
from kube import apply_patch, validate

from meshgate.errors import ConfigError
from meshgate.sidecar.injector import SIDECAR_NAME, InjectSettings, inject
from meshgate.sidecar.webhook import WebhookServer, review, server_tls

SETTINGS = InjectSettings(control_plane="cp.svc:18000")
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}


def agent_pod(agent: str | None = "coder") -> dict[str, Any]:
    labels = {"meshgate.dev/agent": agent} if agent else {"app": "web"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "coder-", "namespace": "agents", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "python:3.12"}]},
    }


def admission(obj: Any = None, uid: str = "u-1", kind: dict[str, str] | None = None) -> bytes:
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind or POD_KIND,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "agents",
        "operation": "CREATE",
        "object": agent_pod() if obj is None else obj,
    }
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def decoded_patch(answer: dict[str, Any]) -> list[dict[str, Any]]:
    assert answer["response"]["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(answer["response"]["patch"]))
    return patch


def test_labelled_pod_is_allowed_with_a_patch_that_yields_the_offline_injection() -> None:
    status, answer = review(admission(), SETTINGS)
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == "u-1" and answer["response"]["allowed"] is True
    patched = apply_patch(agent_pod(), decoded_patch(answer))
    assert patched == inject(agent_pod(), SETTINGS)
    validate(patched)


def test_already_injected_and_unlabelled_pods_are_allowed_without_a_patch() -> None:
    for obj in (inject(agent_pod(), SETTINGS), agent_pod(agent=None)):
        status, answer = review(admission(obj), SETTINGS)
        assert status == 200
        assert answer["response"] == {"uid": "u-1", "allowed": True}


def test_other_kinds_pass_unchanged() -> None:
    kind = {"group": "apps", "version": "v1", "kind": "Deployment"}
    status, answer = review(admission({"kind": "Deployment"}, kind=kind), SETTINGS)
    assert (status, answer["response"]) == (200, {"uid": "u-1", "allowed": True})


def test_a_labelled_pod_that_cannot_be_injected_is_refused_with_the_reason() -> None:
    pod = agent_pod()
    pod["spec"]["hostNetwork"] = True
    status, answer = review(admission(pod), SETTINGS)
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "u-1" and response["allowed"] is False
    assert "hostNetwork" in response["status"]["message"] and "patch" not in response


def review_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()


GOOD_REQUEST = json.loads(admission())["request"]
MALFORMED = {
    "not json": (b"{not json", "not JSON"),
    "not utf-8": (b"\xff\xfe", "not JSON"),
    "array": (b"[]", "JSON object"),
    "wrong apiVersion": (
        review_of(
            {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}
        ),
        "expected admission.k8s.io/v1 AdmissionReview",
    ),
    "wrong kind": (
        review_of({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": {}}),
        "expected admission.k8s.io/v1 AdmissionReview",
    ),
    "no request": (
        review_of({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
        "no request",
    ),
    "no uid": (
        review_of(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {k: v for k, v in GOOD_REQUEST.items() if k != "uid"},
            }
        ),
        "no uid",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_reviews_get_400_and_an_error_review(case: str) -> None:
    body, message = MALFORMED[case]
    status, answer = review(body, SETTINGS)
    assert status == 400
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["allowed"] is False and response["uid"] == ""
    assert response["status"]["code"] == 400 and message in response["status"]["message"]


def test_a_review_with_uid_but_no_object_is_refused_against_that_uid() -> None:
    request = {k: v for k, v in GOOD_REQUEST.items() if k != "object"}
    body = review_of(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    )
    status, answer = review(body, SETTINGS)
    assert status == 200
    assert answer["response"]["uid"] == "u-1" and answer["response"]["allowed"] is False
    assert "no object" in answer["response"]["status"]["message"]


async def test_https_end_to_end_with_a_verifying_client(tmp_path: Path) -> None:
    ca, cert, key = write_test_pki(tmp_path, ["localhost", "meshgate-injector.meshgate-system.svc"])
    port = free_port()
    server = WebhookServer(SETTINGS, cert, key, "127.0.0.1", port)
    await server.start()
    try:
        verify = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=verify, timeout=10) as client:
            base = f"https://localhost:{port}"
            assert (await client.get(f"{base}/healthz")).json() == {"ok": True}
            resp = await client.post(
                f"{base}/mutate", content=admission(), headers={"content-type": "application/json"}
            )
            assert resp.status_code == 200
            patched = apply_patch(agent_pod(), decoded_patch(resp.json()))
            assert patched["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
            bad = await client.post(f"{base}/mutate", content=b"nope")
            assert bad.status_code == 400
            assert bad.json()["response"]["status"]["message"] == "request body is not JSON"
        # a client that does not trust our CA is refused at the handshake
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"https://localhost:{port}/healthz")
        # TLS is required: plain HTTP gets no answer
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        await server.stop()


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    ca_a, cert, key = write_test_pki(tmp_path / "a", ["localhost"], name="a")
    ca_b, cert_b, key_b = write_test_pki(tmp_path / "b", ["localhost"], name="b")
    port = free_port()
    server = WebhookServer(SETTINGS, cert, key, "127.0.0.1", port, reload_interval=3600)
    await server.start()

    async def healthy(ca: Path) -> bool:
        verify = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=verify, timeout=5) as client:
            try:
                return (await client.get(f"https://localhost:{port}/healthz")).is_success
            except httpx.ConnectError:
                return False

    try:
        assert await healthy(ca_a) and not await healthy(ca_b)
        assert server.reload_if_changed() is False  # nothing changed
        # a broken renewal (key of another certificate) is refused; the old pair keeps serving
        key.write_bytes(key_b.read_bytes())
        os.utime(key, (1, 1))
        assert server.reload_if_changed() is False
        assert await healthy(ca_a)
        cert.write_bytes(cert_b.read_bytes())
        os.utime(cert, (2, 2))
        assert server.reload_if_changed() is True
        assert await healthy(ca_b) and not await healthy(ca_a)
    finally:
        await server.stop()


def test_unusable_tls_files_are_one_line_errors(tmp_path: Path) -> None:
    _, cert, key = write_test_pki(tmp_path, ["localhost"])
    with pytest.raises(ConfigError, match=r"missing\.pem: file not found"):
        server_tls(tmp_path / "missing.pem", key)
    with pytest.raises(ConfigError, match="not a usable certificate and key"):
        server_tls(key, cert)


def test_cli_inject_serve_refuses_missing_cert_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshgate.cli",
            "inject",
            "serve",
            "--cert",
            str(tmp_path / "tls.crt"),
            "--key",
            str(tmp_path / "tls.key"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {tmp_path / 'tls.crt'}: file not found"


async def test_cli_inject_serve_answers_over_https_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca, cert, key = write_test_pki(tmp_path, ["localhost"])
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshgate.cli",
        "inject",
        "serve",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--image",
        "img:2",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        verify = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=verify, timeout=5) as client:
            for _ in range(200):
                try:
                    resp = await client.post(
                        f"https://localhost:{port}/mutate", content=admission()
                    )
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("webhook did not start")
        patched = apply_patch(agent_pod(), decoded_patch(resp.json()))
        assert patched["spec"]["initContainers"][0]["image"] == "img:2"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
