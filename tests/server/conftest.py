"""Real in-process servers on port 0 with the real (built-in) policy network."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tamiyo.config import BatchConfig, ServerConfig
from tamiyo.policy.builtin import builtin_policy
from tamiyo_server.app import TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy, serve_loaded

ServerFactory = Callable[..., Coroutine[Any, Any, TamiyoServer]]


@pytest.fixture(scope="session")
def served_policy() -> ServedPolicy:
    """Loaded and warmed once; servers share it (the engine is read-only)."""
    return serve_loaded(builtin_policy(), "cpu")


def make_config(**over: Any) -> ServerConfig:
    """Port 0, no metrics port, and a generous decision deadline: the machine running the
    tests is shared and noisy, and tests must not depend on timing (the shedding tests
    set their own deadlines)."""
    batch = replace(BatchConfig(), decision_deadline_ms=2000.0, max_deadline_ms=5000.0)
    base = replace(ServerConfig(), port=0, metrics_port=0, grace_s=2.0, batch=batch)
    return replace(base, **over)


@pytest.fixture
async def make_server(served_policy: ServedPolicy) -> AsyncIterator[ServerFactory]:
    started: list[TamiyoServer] = []

    async def make(config: ServerConfig | None = None) -> TamiyoServer:
        srv = TamiyoServer(config or make_config(), policy=served_policy)
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


@pytest.fixture
async def server(make_server: ServerFactory) -> TamiyoServer:
    return await make_server()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a server and a client certificate signed by it (EC P-256), made
    with the openssl CLI (the ``cryptography`` package is not a dependency); tests that
    need them are skipped only when openssl is absent."""
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
