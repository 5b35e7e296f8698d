"""Bearer token (deny by default, constant-time compare), TLS and mTLS with real certs.

Certificates are generated per test run with the openssl CLI (the ``cryptography``
package is not a dependency); the test is skipped only when openssl is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import auth
from tests.server import hosts
from tests.server.conftest import ServerFactory, make_config

TOKEN = "s3cret-token-value"


async def _policy_info(ch: grpc.aio.Channel, token: str | None = None) -> grpc.StatusCode:
    md = (("authorization", f"Bearer {token}"),) if token is not None else None
    try:
        await pb_grpc.TamiyoServiceStub(ch).GetPolicyInfo(pb.GetPolicyInfoRequest(), metadata=md)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_token_denies_by_default(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # auth looks it up per call
    srv = await make_server(make_config(auth_token=TOKEN))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert await _policy_info(ch) == grpc.StatusCode.UNAUTHENTICATED
        assert await _policy_info(ch, "wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert await _policy_info(ch, TOKEN[:-1]) == grpc.StatusCode.UNAUTHENTICATED
        assert await _policy_info(ch, TOKEN) == grpc.StatusCode.OK
        assert compared  # the comparison went through hmac.compare_digest
        stub = pb_grpc.TamiyoServiceStub(ch)
        call = stub.StreamTelemetry(None)
        # The server refuses on the metadata alone; the write can lose the race with that
        # refusal and fail on its own (CI saw INTERNAL "execute_batch" from it).
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(hosts.session_open(4))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.StreamTelemetry(None, metadata=(("authorization", f"Bearer {TOKEN}"),))
        await ok.write(hosts.session_open(4))
        first = await ok.read()
        assert isinstance(first, pb.StreamTelemetryResponse)
        assert first.HasField("session_accepted")
        await ok.done_writing()
        # Health stays open for probes.
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty token"):
        auth.BearerTokenInterceptor("")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=tamiyo-test-ca", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "2",
                 "-extfile", f"{who}.ext", cwd=d)  # fmt: skip
    return d


async def test_tls(make_server: ServerFactory, certs: Path) -> None:
    srv = await make_server(
        make_config(tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"))
    )
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", creds) as ch:
        assert await _policy_info(ch) == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as plain:
        assert await _policy_info(plain) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate(make_server: ServerFactory, certs: Path) -> None:
    srv = await make_server(
        make_config(
            tls_cert_file=str(certs / "server.pem"),
            tls_key_file=str(certs / "server.key"),
            tls_client_ca_file=str(certs / "ca.pem"),
        )
    )
    ca = (certs / "ca.pem").read_bytes()
    anonymous = grpc.ssl_channel_credentials(ca)
    async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", anonymous) as ch:
        assert await _policy_info(ch) == grpc.StatusCode.UNAVAILABLE
    with_cert = grpc.ssl_channel_credentials(
        ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", with_cert) as ch:
        assert await _policy_info(ch) == grpc.StatusCode.OK
