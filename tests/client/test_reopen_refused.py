"""The client against a server that refuses SessionOpens for load
(``tamiyo_server.open_admission``): a refused re-open (``update_session``; in-stream
RESOURCE_EXHAUSTED on field ``session_open`` with ``retry_after_ms``, the previous session
in force) is sent again, the latest one, after the pushback, until it is in force; a
refused first open (the call's status, with gRPC's ``grpc-retry-pushback-ms`` trailer) is
retried on a new stream no sooner than the pushback says.

Before, the client counted a refused re-open as a shed frame and never sent it again:
the host believed its topology update had gone through while the server kept deciding
on the old one; and it retried a refused first open after its own backoff alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from tamiyo.config import BatchConfig, ClientConfig
from tamiyo_client.client import TamiyoClient
from tamiyo_server.app import TamiyoServer
from tamiyo_server.stream import StreamHandler
from tests.server import hosts

from .conftest import ServerFactory


def _refused(server: TamiyoServer) -> float:
    got = server.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": "open_overload"})
    return got or 0.0


def _refuse_opens(server: TamiyoServer, refuse: bool) -> None:
    """Every SessionOpen refused (an hour of open work ahead), or admitted again."""
    assert server.pipeline is not None
    server.pipeline.door.opens.free_at = time.monotonic() + 3600.0 if refuse else 0.0


def _handler(server: TamiyoServer) -> StreamHandler:
    (h,) = server.servicer.streams
    return h


async def _until(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.005)


def _config(port: int, backoff_s: tuple[float, float] | None = None) -> ClientConfig:
    cfg = replace(ClientConfig(), target=f"127.0.0.1:{port}")
    if backoff_s is not None:
        cfg = replace(cfg, backoff_initial_s=backoff_s[0], backoff_max_s=backoff_s[1])
    return cfg


async def test_a_refused_update_session_is_sent_again_until_the_latest_is_in_force(
    make_server: ServerFactory,
) -> None:
    server = await make_server(batch=BatchConfig(min_pushback_ms=20.0, max_pushback_ms=40.0))
    client = TamiyoClient(hosts.session_open(6).session_open, _config(server.port))
    await client.start()
    try:
        assert await client.wait_connected(10), client.last_error
        first = client.session_id
        _refuse_opens(server, True)
        client.update_session(hosts.session_open(8).session_open)
        # refused, and sent again after each ~20-60 ms pushback
        await _until(
            "the re-open sent again",
            lambda: _refused(server) >= 3 and client.stats.session_updates_refused >= 3,
        )
        assert client.session_id == first  # the server's session is still the old one
        assert len(_handler(server).session.info.layer_index) == 6  # type: ignore[union-attr]
        assert "refused for load" in client.last_error, client.last_error
        assert client.stats.frames_shed == 0  # not a shed frame

        # A newer topology replaces the one still to send (only the latest matters), and
        # its frames wait for it rather than being read against the old session.
        client.update_session(hosts.session_open(10).session_open)
        sent = client.stats.frames_sent
        client.send_frame(hosts.frame(10, 1, tag="on-ten").frame)
        await asyncio.sleep(0.3)
        assert client.stats.frames_sent == sent  # held while the re-open is refused
        refused, sessions = _refused(server), client.stats.sessions

        got: list[str] = []
        client.add_callback(lambda d: got.append(d.decision.frame_request_id))
        _refuse_opens(server, False)
        await _until("the latest topology in force", lambda: client.session_id != first)
        await _until("the held frame answered", lambda: "on-ten" in got)
        assert len(_handler(server).session.info.layer_index) == 10  # type: ignore[union-attr]
        assert client.stats.sessions == sessions + 1  # one re-open went through, the latest
        assert client.last_error == ""
        assert _refused(server) <= refused + 1  # (one may have been on its way)
        assert client.stats.stream_errors == 0  # no frame was read against the old topology
    finally:
        await client.close()


async def test_a_refused_first_open_is_retried_after_its_pushback_not_before(
    make_server: ServerFactory,
) -> None:
    """Backoff 10-20 ms, pushback 300-450 ms: in one second of refusals the client comes
    back at most four times (it came back every ~20 ms), then connects once admitted."""
    batch = BatchConfig(min_pushback_ms=300.0, max_pushback_ms=300.0, max_open_wait_ms=0.0)
    server = await make_server(batch=batch)
    _refuse_opens(server, True)
    cfg = _config(server.port, backoff_s=(0.01, 0.02))
    client = TamiyoClient(hosts.session_open(6).session_open, cfg)
    await client.start()
    try:
        await _until("a first open refused", lambda: _refused(server) >= 1)
        t0, n0 = time.monotonic(), _refused(server)
        await asyncio.sleep(1.0)
        n = _refused(server) - n0
        assert 1 <= n <= 4, f"{n} refused first opens in {time.monotonic() - t0:.2f} s"
        assert not client.fatal_error  # a refusal for load is not a configuration error
        assert client.last_error.startswith("RESOURCE_EXHAUSTED"), client.last_error
        _refuse_opens(server, False)
        assert await client.wait_connected(5), client.last_error
    finally:
        await client.close()
