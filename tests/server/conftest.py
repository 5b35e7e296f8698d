"""Real in-process servers on port 0 with the real (built-in) policy network."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
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
