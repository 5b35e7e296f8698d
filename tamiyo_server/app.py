"""Assemble the grpc.aio server: Tamiyo's service, health, reflection, metrics, auth,
and graceful shutdown.

Lifecycle: health is NOT_SERVING from the first moment; ``start()`` loads and warms up
the policy (off the event loop), starts the batcher, and only then reports
SERVING. ``stop()`` reverses it within one grace: NOT_SERVING, streams told to close
(SessionClosing), in-flight evaluations answered, streams ended, then gRPC's own stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tamiyo.config import ServerConfig
from tamiyo.policy.checkpoint import CheckpointError
from tamiyo.policy.engine import configure_allocator, configure_threads
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.auth import BearerTokenInterceptor, server_credentials
from tamiyo_server.decode_guard import UndecodableRequestGuard
from tamiyo_server.experience_log import ExperienceLog
from tamiyo_server.metrics import MetricsInterceptor, ServerMetrics
from tamiyo_server.pipeline import DecisionPipeline
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tamiyo_server.preflight import StartupError, preflight
from tamiyo_server.reload import CheckpointWatcher, load_pinned, load_startup
from tamiyo_server.servicer import TamiyoServicer
from tamiyo_server.stream import StreamHandler

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TamiyoService"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments: message size, stream limits raised for 2,000+ concurrent
    streams, and keepalive pings that find a dead client within
    keepalive_time + keepalive_timeout (default 10 + 5 s), not the TCP default of hours;
    no port sharing."""
    lim = config.limits
    return [
        ("grpc.max_receive_message_length", lim.max_message_bytes),
        ("grpc.max_send_message_length", lim.max_message_bytes),
        # Per connection; a little above the server-wide cap so that the stream one
        # too many reaches the servicer and gets an explicit RESOURCE_EXHAUSTED
        # instead of waiting silently in HTTP/2 flow control.
        ("grpc.max_concurrent_streams", lim.max_concurrent_streams + 16),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        # Newer gRPC cores time out an unanswered ping with this one (default 1 min).
        ("grpc.http2.ping_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.max_connection_idle_ms", 0x7FFFFFFF),
        # grpc turns SO_REUSEPORT on by default: a second server started on a taken port
        # would then bind it too and silently take part of the clients.
        ("grpc.so_reuseport", 0),
    ]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpcio-health-checking's servicer plus the health protocol's ``List``, which it
    registers but answers UNIMPLEMENTED. Why: ``List`` is exempt from the bearer token
    like ``Check`` and ``Watch`` (``tamiyo_server.auth``), and a probe or an operator
    listing health by hand should get the statuses, not an error."""

    async def List(  # noqa: N802 (the RPC's name)
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        resp = health_pb2.HealthListResponse()
        for name, status in dict(self._server_status).items():  # (the library's own map)
            resp.statuses[name].status = status
        return resp


class TamiyoServer:
    """A running Tamiyo server. ``start()`` binds and returns the port; ``stop()`` drains.

    ``policy`` lets tests and benchmarks pass an already loaded policy; otherwise
    ``start()`` loads ``config.checkpoint_dir`` (or the bundled default / built-in).
    """

    def __init__(self, config: ServerConfig, policy: ServedPolicy | None = None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self._policy = policy
        self.health = HealthServicer()
        # metrics see every outcome; undecodable bytes are refused before the servicer
        # (and after auth, which refuses them first without a token)
        rejected = self.metrics.rejected.labels("undecodable")
        interceptors: list[grpc.aio.ServerInterceptor] = [  # type: ignore[type-arg]
            MetricsInterceptor(self.metrics),
            UndecodableRequestGuard(rejected.inc),
        ]
        if config.auth_token:
            interceptors.append(BearerTokenInterceptor(config.auth_token))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=grpc_options(config),
            maximum_concurrent_rpcs=None,
        )
        self.pipeline: DecisionPipeline | None = None
        # Registered before start so the port answers (UNAVAILABLE, health NOT_SERVING)
        # while the policy loads; the pipeline is plugged in once it is warm.
        self.servicer = TamiyoServicer()
        pb_grpc.add_TamiyoServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self.watcher: CheckpointWatcher | None = None  # hot reload (tamiyo_server.reload)
        self.experience: ExperienceLog | None = None  # on when config.experience.dir is set
        self.metrics_port = 0
        self.drained: Drained | None = None  # set by stop() after a drain
        # Monotonic seconds; what stop()'s budget is measured with (tests inject one).
        self.clock: Callable[[], float] = time.monotonic

    async def start(self) -> int:
        """Bind and answer at once (health NOT_SERVING), load + warm up + calibrate the
        policy, then report SERVING. Returns the bound port."""
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        c = self.config
        _check_device(c.device)
        preflight(c)  # TLS files, directories: before anything binds or loads
        address = f"{c.host}:{c.port}"
        taken = OSError(
            f"gRPC port {address}: cannot bind (in use by another process, or --host "
            f"{c.host} is not an address of this host)"
        )
        try:
            if c.tls_cert_file:
                creds = server_credentials(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file)
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:  # grpc's "Failed to bind" (the cause only in its log)
            raise taken from e
        if self.port == 0:
            raise taken
        if c.metrics_port:  # before anything slow: a taken port fails the start at once
            self.metrics_port = self.metrics.start(c.metrics_host or c.host, c.metrics_port)
        await self.server.start()
        served = self._policy
        refused: tuple[str, str] | None = None  # a broken latest refused at startup
        if served is None and c.pin_checkpoint:
            served = await asyncio.to_thread(load_pinned, c)
        if served is None:
            started = await asyncio.to_thread(load_startup, c)
            served, refused = started[0], started[1]
        holder = PolicyHolder(served, self.metrics, pinned=bool(c.pin_checkpoint))
        if refused is not None:
            holder.refuse(*refused)
        self.pipeline = DecisionPipeline(c, holder, self.metrics)
        if c.experience.dir:
            window = served.schema.window
            try:
                self.experience = ExperienceLog(c.experience, window, self.metrics.registry)
            except OSError as e:  # (preflight wrote there; the disk may have changed since)
                raise StartupError(f"--experience-dir {c.experience.dir}: {e}") from e
            self.pipeline.experience = self.experience
        configure_threads(c.torch_threads)
        # glibc keeps freed activations for reuse instead of page-faulting them in on every
        # forward (policy.engine.configure_allocator: 64 graphs 6.6 → 4.4 ms on this box)
        configure_allocator()
        await asyncio.to_thread(self.pipeline.calibrate)
        self.pipeline.start()
        if c.checkpoint_dir and not c.pin_checkpoint:
            self.watcher = CheckpointWatcher.for_server(c, holder)
            self.watcher.start()
        self.servicer.pipeline = self.pipeline
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.auth_token and not c.tls_cert_file and not is_loopback(c.host):
            log.warning(
                "a bearer token is required but the gRPC port %s:%d is plaintext on a "
                "non-loopback address: the token travels in cleartext to anyone on the "
                "path; terminate TLS here (--tls-cert, --tls-key) or at a proxy in front "
                "(and bind --host to loopback or a private address then)",
                c.host,
                self.port,
            )
        log.info(
            "tamiyo serving on %s:%d (policy %s, forward %s, %s, auth: %s)",
            c.host,
            self.port,
            served.version,
            served.engine.forward_name,
            "mTLS" if c.tls_client_ca_file else "TLS" if c.tls_cert_file else "plaintext",
            "bearer token" if c.auth_token else "none",
        )
        return self.port

    async def stop(self) -> None:
        """Graceful shutdown within one budget: ``grace_s`` from the call, shared by
        every drain phase (``ShutdownBudget``), then a short bounded tail
        (``SHUTDOWN_TAIL_S``). Ends with one log line saying how the drain went
        (``Drained``), which is what an operator checks after a rollout: were streams
        cut, was in-flight work answered.

        Order: NOT_SERVING; the reload watcher is *signalled* to stop (a poll stuck on a
        hung checkpoint volume must not delay what follows); SessionClosing to every
        stream; queued evaluations answered; streams ended as their clients half-close,
        those still open at the deadline cut; the experience log flushed. Each of these
        waits at most what is left until the deadline. Then gRPC stops
        (``FINAL_GRACE_S``), the batcher stops (its inference thread, signalled before
        gRPC's stop, is joined until ``FINAL_GRACE_S`` past the deadline; one still in
        a batch then is left behind, a daemon thread), the watcher is joined within what
        is left (still stuck: left behind too) and the experience log gets
        ``EXPERIENCE_CLOSE_S`` to commit its last records and exit (a process that takes
        no records is killed then). So a stop ends within ``grace_s`` +
        ``SHUTDOWN_TAIL_S`` even when the experience process or a batch is stuck
        (``tests/server/test_shutdown_bound.py``)."""
        budget = ShutdownBudget(self.config.grace_s, self.clock)
        await self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            self.watcher.request_stop()
        # (a start may fail before the pipeline runs: nothing to drain or stop then)
        pipeline = self.pipeline if self.pipeline is not None and self.pipeline.running else None
        streams = list(self.servicer.streams) if pipeline is not None else []
        cut: set[StreamHandler] = set()
        queued = 0
        answered = True
        if pipeline is not None:
            pipeline.closing = True
            for h in streams:
                h.close("server shutting down", reconnect_after_ms=1000)
            queued = pipeline.batcher.queued
            answered = await pipeline.batcher.drain(budget.left())
            if streams:
                cut = await self._end_streams(streams, budget.left())
        if self.experience is not None:  # decisions answered so far are on disk
            flush_s = budget.left()  # (0 when a stream used the grace up: close commits)
            if not await asyncio.to_thread(self.experience.flush, flush_s) and flush_s > 0:
                log.warning(
                    "the experience log did not commit within the grace (%.1f s left of "
                    "it; a slow disk, a stopped experience process?); its close gets "
                    "%.0f s, then the process is killed",
                    flush_s,
                    EXPERIENCE_CLOSE_S,
                )
        shed_before = self._shed_at_shutdown()
        if pipeline is not None:  # (signalled now: the thread ends while gRPC stops)
            pipeline.batcher.request_stop()
        # Our own work is answered by now (streams ended or cut, the batcher drained);
        # what is left open are calls that never end by themselves, such as a health
        # Watch, which held every shutdown for the whole grace. (Outside the budget: a
        # cut stream's UNAVAILABLE status must still get out when the grace is used up.)
        await self.server.stop(FINAL_GRACE_S)
        # The inference thread shares gRPC's slot: joined until FINAL_GRACE_S past the
        # grace (a batch still running then is left behind; it used to get 10 s more).
        if pipeline is not None and not await pipeline.stop(budget.left(FINAL_GRACE_S)):
            log.warning(
                "a batch was still running %.0f s after the %g s grace (a stuck device?); "
                "shutting down without the inference thread (left behind, a daemon "
                "thread; what was queued behind it is shed)",
                FINAL_GRACE_S,
                budget.grace_s,
            )
        if self.watcher is not None and not await asyncio.to_thread(
            self.watcher.join, budget.left()
        ):
            log.warning(
                "the checkpoint watcher is still in a poll of %s at the end of the grace "
                "(a hung checkpoint volume?); shutting down without it",
                self.watcher.root,
            )
        # The experience log's last commit, and the metrics endpoint's stop meanwhile
        # (its serving loop notices the stop within 0.5 s: not on top of the tail).
        await asyncio.gather(
            asyncio.to_thread(self._close_experience),
            asyncio.to_thread(self.metrics.stop),
        )
        if pipeline is not None:
            gone = sum(h.broken for h in streams if h not in cut)
            self.drained = Drained(
                len(streams) - len(cut) - gone,
                gone,
                len(cut),
                budget.grace_s,
                queued,
                answered,
                int(self._shed_at_shutdown() - shed_before),
                budget.elapsed(),
            )
            log.info("%s", self.drained)

    async def _end_streams(
        self, streams: list[StreamHandler], timeout_s: float
    ) -> set[StreamHandler]:
        """Wait up to ``timeout_s`` for the streams to end; cut (UNAVAILABLE) and return
        those still open then. A stream ends when its client half-closes (after
        SessionClosing) and its last answer is out."""
        _, open_ = await asyncio.wait(
            [asyncio.create_task(h.ended.wait()) for h in streams], timeout=timeout_s
        )
        cut = set()
        for h in streams:
            if not h.ended.is_set():
                h.cut()
                cut.add(h)
        for task in open_:
            task.cancel()
        return cut

    def _close_experience(self) -> None:
        """``ExperienceLog.close`` within ``EXPERIENCE_CLOSE_S`` (it kills a process that
        took no records or did not exit by then)."""
        if self.experience is not None:
            self.experience.close(EXPERIENCE_CLOSE_S)

    def _shed_at_shutdown(self) -> float:
        """Evaluations answered with a rules-only decision because the server stopped."""
        value = self.metrics.registry.get_sample_value("tamiyo_shed_total", {"reason": "shutdown"})
        return value or 0.0


class ShutdownBudget:
    """One deadline for the whole drain: ``grace_s`` seconds from the stop signal.

    Why one deadline and not a timeout per phase: the phases (batcher drain, streams,
    experience flush, watcher) run one after another, and with the whole grace each a
    stop took several graces (2.3 s for a 1 s grace in review 15) and could run past the
    orchestrator's ``terminationGracePeriodSeconds``, whose SIGKILL then ends the drain
    half done. Each phase waits at most ``left()``, so one that uses the grace up leaves
    the later ones 0 s instead of a grace of their own. ``clock`` is monotonic seconds
    (tests inject one)."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self.start = clock()
        self.deadline = self.start + grace_s

    def left(self, extra_s: float = 0.0) -> float:
        """Seconds until the deadline (+ ``extra_s``: a slot of the tail after it); 0.0
        once that has passed (never negative)."""
        return max(0.0, self.deadline + extra_s - self._clock())

    def elapsed(self) -> float:
        """Seconds since the budget started (the stop signal)."""
        return self._clock() - self.start


class Drained(NamedTuple):
    """How a ``TamiyoServer.stop`` went (its last log line is ``str`` of this)."""

    closed: int  # streams whose client half-closed after SessionClosing: clean
    gone: int  # streams whose client went away during the drain
    cut: int  # streams still open at the grace limit, ended with UNAVAILABLE
    grace_s: float
    queued: int  # evaluations waiting for a batch at the signal
    answered: bool  # the batcher ran everything queued within the grace
    shed: int  # evaluations answered rules-only (shed "shutdown"): the batcher had stopped
    seconds: float  # from the start of the stop (the signal) to its end

    def __str__(self) -> str:
        gone = f", {self.gone} ended by their client going away" if self.gone else ""
        work = "answered" if self.answered else "NOT all answered within the grace"
        shed = f", {self.shed} shed at shutdown" if self.shed else ""
        return (
            f"drained in {self.seconds:.1f} s: {self.closed} streams closed cleanly, "
            f"{self.cut} cut at the {self.grace_s:g} s grace limit{gone}; in flight: "
            f"{self.queued} queued evaluations {work}{shed}; stopped"
        )


def freeze_startup_heap() -> int:
    """Move every object alive now (~250k after start: torch, grpc, protobuf modules,
    the policy) out of the garbage collector's reach; returns how many.

    Why: CPython's full (generation 2) collection walks every tracked object. With the
    startup heap in it, one took 75-116 ms on this box, every few tens of seconds under
    load, and the event loop (which runs the batches on CPU) stood still meanwhile:
    ~30 decisions past their deadline per pause at 300 frames/s. Frozen, the same
    collection took 0.7 ms. Process-wide, so ``serve`` calls it, not in-process tests.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def is_loopback(host: str) -> bool:
    """``host`` (a ``--host`` value) only reaches this machine: ``localhost`` or a loopback
    IP (``127.0.0.0/8``, ``::1``, bracketed or not). Any other name counts as reachable
    from outside, as do the wildcards ``0.0.0.0`` / ``::`` (no DNS lookup here)."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_device(device: str) -> None:
    """A CUDA device this host does not have stops the start with one line (torch would
    raise from deep inside the first model copy)."""
    if not device.startswith("cuda"):
        return
    index = int(device.partition(":")[2] or 0)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= have:
        raise StartupError(
            f"--device {device}: this host has {have} usable CUDA device(s) (torch "
            f"{torch.__version__}); use auto or cpu"
        )


FINAL_GRACE_S = 1.0
"""Grace (s) for gRPC's own stop, after the drain: enough to flush the last answers
(and a cut stream's UNAVAILABLE status) when the drain used the whole grace."""
EXPERIENCE_CLOSE_S = 3.0
"""Seconds ``ExperienceLog.close`` gets in all (hand over, process exit; one deadline)
after the drain, for the experience process to commit its last records. Why not what
is left of the grace: that is 0 when a stream used the grace up, and the process would
be killed with records the in-grace flush did not cover (decisions answered while gRPC
stopped)."""
SHUTDOWN_TAIL_S = FINAL_GRACE_S + EXPERIENCE_CLOSE_S
"""Seconds a ``stop()`` may run past ``--grace-s``, also when the experience process
stopped reading or a batch (thread mode) never ends: gRPC's stop and the inference
thread's join share ``FINAL_GRACE_S``, the experience log's close (which kills a stuck
process) ``EXPERIENCE_CLOSE_S``; a stuck thread is left behind. Normally the tail is
short: the batcher and the experience process finish at once. Deployments set
``terminationGracePeriodSeconds`` (``stop_grace_period``) to at least preStop +
``--grace-s`` + this + a margin (``tests/reliability/test_manifests.py`` checks it)."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now() -> None:
    """A second SIGINT / SIGTERM during the drain: the operator wants out now."""
    log.warning("second signal: exiting without finishing the drain")
    logging.shutdown()
    os._exit(130)


def _on_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> None:
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, handler)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully. A failed start releases what
    did start (ports, threads, files) and raises ``StartupError`` for an ``OSError``.

    The signal handlers are installed before anything starts, so a signal at any moment
    of the start is a stop: before the server is SERVING it cancels the start (at its
    next await; a policy load or calibration already in a thread finishes first) and
    releases what did start; once SERVING (``tamiyo serving on`` is logged after that),
    it drains. Either way ``serve`` returns normally (exit 0). They used to be installed
    after the start and the heap freeze, and a SIGTERM in between killed the process
    (exit 143, no log line; QA16 N3)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _on_signals(loop, stop.set)
    server = TamiyoServer(config)
    if await _start(server, stop):
        log.info("garbage collector: %d startup objects frozen", freeze_startup_heap())
        await stop.wait()
        log.info("shutting down (grace %.1f s; a second signal exits at once)", config.grace_s)
    _on_signals(loop, _exit_now)
    await server.stop()


async def _start(server: TamiyoServer, stop: asyncio.Event) -> bool:
    """``server.start()``, cut short by ``stop``: True once serving, False when the stop
    came first (the start is cancelled; the caller's ``stop()`` releases what started).
    A start that fails, or ``serve`` cancelled from outside, is cleaned up here and the
    error raised (``StartupError`` for an ``OSError`` or a bad pinned checkpoint: one
    line, no traceback)."""
    starting = asyncio.ensure_future(server.start())
    signalled = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            if not stop.is_set():  # (ours was the stop's cancel only when stop is set)
                raise
            log.info("stop signal during start-up: stopping before serving")
            return False
    except BaseException as exc:
        if not starting.done():  # serve itself cancelled while waiting
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
        try:
            await server.stop()
        except Exception:  # the start's own error is the one to report
            log.exception("cleanup after a failed start failed")
        if isinstance(exc, OSError | CheckpointError):  # bad pin: one line, no traceback
            raise StartupError(str(exc)) from exc
        raise
    finally:
        signalled.cancel()
    return True
