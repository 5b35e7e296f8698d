"""Bearer token (deny by default, constant-time compare), TLS and mTLS with real certs.

Certificates are generated per test run with the openssl CLI (``certs`` in conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import __main__ as server_main
from tamiyo_server import auth
from tamiyo_server.app import SERVICE_NAME, TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy
from tamiyo_server.preflight import StartupError
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
        # Health stays open for probes: all of it, List included (the runbook says "every
        # RPC but the health service"; List used to be refused)
        health_stub = health_pb2_grpc.HealthStub(ch)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listed = await health_stub.List(health_pb2.HealthListRequest())
        assert set(listed.statuses) == {"", SERVICE_NAME}
        # ... and nothing else: reflection still needs the token
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reflect.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


ACCEPTED = [  # RFC 7235 §2.1: the scheme is case-insensitive; RFC 6750: "Bearer" 1*SP token
    f"Bearer {TOKEN}",
    f"bearer {TOKEN}",
    f"BEARER {TOKEN}",
    f"bEaReR {TOKEN}",
    f"Bearer   {TOKEN}",
    f" Bearer {TOKEN}\t",  # optional whitespace around a field value (RFC 9110 §5.5)
]
REFUSED = [
    TOKEN,  # no scheme
    f"Basic {TOKEN}",
    f"Bearer{TOKEN}",  # no separator
    f"Bearer\t{TOKEN}",  # RFC 6750 separates with SP only
    f"Bearers {TOKEN}",
    f"Bearer {TOKEN.upper()}",  # the token itself is case-sensitive
    f"Bearer {TOKEN}x",
    f"Bearer {TOKEN} extra",
    "Bearer ",
    "Bearer",
    "",
]


@pytest.mark.parametrize("value", ACCEPTED)
def test_the_bearer_scheme_is_case_insensitive(value: str) -> None:
    """QA16 L3: ``authorization: bearer <token>`` was refused; some clients and proxies
    send the scheme in lower case. Accepted as str and as bytes metadata values."""
    check = auth.BearerTokenInterceptor(TOKEN)._ok
    assert check((("authorization", value),))
    assert check((("authorization", value.encode()),))


@pytest.mark.parametrize("value", REFUSED)
def test_anything_but_bearer_and_the_exact_token_is_refused(value: str) -> None:
    check = auth.BearerTokenInterceptor(TOKEN)._ok
    assert not check((("authorization", value),))
    assert not check((("x-other", f"Bearer {TOKEN}"),))
    assert not check(())
    assert not check(None)


def test_the_token_is_compared_in_constant_time_even_when_the_scheme_is_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every value that reaches the check goes through ``hmac.compare_digest`` against the
    token alone, a lower-case scheme and a foreign one included."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    check = auth.BearerTokenInterceptor(TOKEN)._ok
    assert check((("authorization", f"bearer {TOKEN}"),))
    assert not check((("authorization", f"Basic {TOKEN}"),))
    assert compared == [(TOKEN.encode(), TOKEN.encode()), (b"", TOKEN.encode())]


async def test_a_lowercase_bearer_scheme_is_served(make_server: ServerFactory) -> None:
    """The QA16 repro end to end: ``authorization: bearer <token>`` on a real call."""
    srv = await make_server(make_config(auth_token=TOKEN))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        for scheme in ("bearer", "BEARER"):
            md = (("authorization", f"{scheme} {TOKEN}"),)
            await stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), metadata=md)
        md = (("authorization", f"basic {TOKEN}"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty token"):
        auth.BearerTokenInterceptor("")


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


def _tls_files(certs: Path) -> None:
    """Garbage and a passphrase-protected copy of the server key, beside the good PKI."""
    (certs / "garbage.pem").write_text("not a certificate\n")
    encrypted = certs / "server-encrypted.key"
    if not encrypted.exists():
        subprocess.run(
            ["openssl", "pkey", "-in", str(certs / "server.key"), "-aes256",
             "-passout", "pass:secret", "-out", str(encrypted)],
            check=True, capture_output=True,
        )  # fmt: skip


TLS_REFUSALS = {  # (--tls-cert, --tls-key, --tls-client-ca) -> the one line that names it
    "key-of-another-cert": (
        ("server.pem", "client.key", ""),
        "--tls-key {d}/client.key does not match --tls-cert {d}/server.pem",
    ),
    "cert-not-pem": (("garbage.pem", "server.key", ""), "--tls-cert {d}/garbage.pem: no PEM"),
    "key-not-pem": (("server.pem", "garbage.pem", ""), "--tls-key {d}/garbage.pem: not a PEM"),
    "client-ca-not-pem": (
        ("server.pem", "server.key", "garbage.pem"),
        "--tls-client-ca {d}/garbage.pem: no PEM CA certificate",
    ),
    "cert-missing": (("nope.pem", "server.key", ""), "--tls-cert {d}/nope.pem: No such file"),
    "key-encrypted": (
        ("server.pem", "server-encrypted.key", ""),
        "--tls-key {d}/server-encrypted.key is protected by a passphrase",
    ),
}


@pytest.mark.parametrize("case", list(TLS_REFUSALS))
async def test_bad_tls_material_is_named_before_anything_binds(
    case: str, certs: Path, served_policy: ServedPolicy
) -> None:
    """gRPC reported every one of these as "cannot bind" (in use, or not valid PEM),
    and a valid key of another certificate named no cause at all (QA finding 4)."""
    _tls_files(certs)
    (cert, key, ca), message = TLS_REFUSALS[case]
    config = make_config(
        tls_cert_file=str(certs / cert),
        tls_key_file=str(certs / key),
        tls_client_ca_file=str(certs / ca) if ca else "",
    )
    srv = TamiyoServer(config, policy=served_policy)
    with pytest.raises(StartupError) as err:
        await srv.start()
    assert str(err.value).startswith(message.format(d=certs))
    assert "bind" not in str(err.value)
    assert srv.port == 0  # refused before the port was bound
    await srv.stop()


def test_the_cli_says_which_tls_file_is_wrong_and_exits_2(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--port", "0", "--metrics-port", "0", "--tls-cert", str(certs / "server.pem"),
            "--tls-key", str(certs / "client.key")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        server_main.main(argv)
    assert exit_.value.code == 2
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert said == [
        f"cannot serve: --tls-key {certs}/client.key does not match --tls-cert "
        f"{certs}/server.pem (it is the key of another certificate)"
    ]


@pytest.mark.parametrize(
    ("security", "said"),
    [
        ("plaintext", "plaintext, auth: none)"),
        ("token", "plaintext, auth: bearer token)"),
        ("tls", "TLS, auth: none)"),
        ("mtls+token", "mTLS, auth: bearer token)"),
    ],
)
async def test_the_startup_line_says_how_the_port_is_secured(
    security: str,
    said: str,
    certs: Path,
    make_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The line read the same with and without a token, so a blank TAMIYO_AUTH_TOKEN
    leaving the server open went unseen (QA finding 3)."""
    over: dict[str, str] = {}
    if "token" in security:
        over["auth_token"] = TOKEN
    if "tls" in security:
        over |= {"tls_cert_file": str(certs / "server.pem"),
                 "tls_key_file": str(certs / "server.key")}  # fmt: skip
    if "mtls" in security:
        over["tls_client_ca_file"] = str(certs / "ca.pem")
    with caplog.at_level(logging.INFO, logger="tamiyo_server.app"):
        await make_server(make_config(**over))
    (line,) = [r.getMessage() for r in caplog.records if "tamiyo serving on" in r.getMessage()]
    assert line.endswith(said)
    assert TOKEN not in caplog.text


def test_a_small_but_valid_key_is_not_refused_by_the_preflight(tmp_path: Path) -> None:
    """The preflight judges parsing and the cert/key match, not the system OpenSSL's
    security level: gRPC's own TLS library serves a 1024-bit RSA key that Python's ssl
    refuses at its default level (EE_KEY_TOO_SMALL), so refusing it would be wrong."""
    import shutil
    import subprocess

    from tamiyo_server.preflight import check_tls

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-days", "1",
         "-keyout", "k.pem", "-out", "c.pem", "-subj", "/CN=localhost"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    check_tls(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


CLEARTEXT = "the token travels in cleartext"


@pytest.mark.parametrize(
    ("host", "security", "warned"),
    [
        ("0.0.0.0", "token", True),  # the Docker image's TAMIYO_HOST
        ("0.0.0.0", "tls+token", False),
        ("0.0.0.0", "plaintext", False),  # no token to leak (the metrics line covers open)
        ("127.0.0.1", "token", False),
        ("localhost", "token", False),
    ],
)
async def test_a_token_over_plaintext_on_a_public_address_is_warned_about(
    host: str,
    security: str,
    warned: bool,
    certs: Path,
    make_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QA16 L4: ``TAMIYO_AUTH_TOKEN=x --host 0.0.0.0`` without TLS started with one INFO
    line; every client then sends the secret in cleartext on every interface."""
    over: dict[str, str] = {"host": host}
    if "token" in security:
        over["auth_token"] = TOKEN
    if "tls" in security:
        over |= {"tls_cert_file": str(certs / "server.pem"),
                 "tls_key_file": str(certs / "server.key")}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tamiyo_server.app"):
        srv = await make_server(make_config(**over))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        (line,) = warnings
        assert CLEARTEXT in line
        assert f"{host}:{srv.port} is plaintext" in line
        assert "--tls-cert" in line
        assert "proxy" in line
        assert TOKEN not in caplog.text
    else:
        assert not [w for w in warnings if CLEARTEXT in w]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("tamiyo.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    from tamiyo_server.app import is_loopback

    assert is_loopback(host) is loopback
