"""Real Tamiyo servers (in-process, port 0, built-in policy network) and a tiny PKI."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tamiyo.config import ServerConfig
from tamiyo.policy.builtin import builtin_policy
from tamiyo_server.app import TamiyoServer
from tamiyo_server.policy_holder import ServedPolicy, serve_loaded

ServerFactory = Callable[..., Coroutine[Any, Any, TamiyoServer]]


@pytest.fixture(scope="session")
def served_policy() -> ServedPolicy:
    """Loaded and warmed once; servers share it (the engine is read-only)."""
    return serve_loaded(builtin_policy(), "cpu")


def server_config(**over: Any) -> ServerConfig:
    return replace(ServerConfig(), **{"port": 0, "metrics_port": 0, "grace_s": 1.0, **over})


@pytest.fixture
async def make_server(served_policy: ServedPolicy) -> AsyncIterator[ServerFactory]:
    """``await make(**config_overrides)`` starts a real server; all are stopped at the end
    (stopping twice is harmless)."""
    started: list[TamiyoServer] = []

    async def make(**over: Any) -> TamiyoServer:
        srv = TamiyoServer(server_config(**over), policy=served_policy)
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for localhost/127.0.0.1, a client cert."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=tamiyo-test-ca", cwd=d,
    )  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
        )  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


class ServerThread:
    """A real server on its own event loop thread, for blocking (synchronous) callers."""

    def __init__(self, policy: ServedPolicy, **over: Any) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.policy = policy
        self.server: TamiyoServer | None = None
        self.start(**over)

    def start(self, **over: Any) -> int:
        async def make() -> TamiyoServer:  # grpc.aio objects belong to the loop they run on
            srv = TamiyoServer(server_config(**over), policy=self.policy)
            await srv.start()
            return srv

        self.server = self._asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)
        return self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self._asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
