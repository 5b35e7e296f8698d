"""From a graph snapshot to an ``AdaptationDecision``: batcher → engine → rules → proto.

Both paths use it: streams (``tamiyo_server.stream``) and unary ``Decide``. A batch
(``_run_batch``: featurize and run the network) runs where ``BatchConfig.run_on`` says,
on the event loop by default on CPU or on the inference thread; the decision rules,
which read and update per-session state, always run on the event loop when the result
comes back, so session state has a single owner and needs no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from tamiyo.config import RuleConfig, ServerConfig, rules_for_policy
from tamiyo.policy.engine import PolicyOutput
from tamiyo.policy.features import GraphTensors, featurize, featurize_many
from tamiyo.policy.rules import DecisionRules, RuleDecision, RuleState
from tamiyo.policy.snapshot import GraphSnapshot, snapshot_from_state
from tamiyo.policy.synthetic import random_snapshot
from tamiyo.v1 import decision_pb2
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.wire import varint
from tamiyo_server.batcher import Batcher, Done, Job
from tamiyo_server.decode_queue import (
    OFFLOAD_SIGNALS,
    SHUTTING_DOWN,
    DecodeQueue,
    RefusedError,
)
from tamiyo_server.door import Door
from tamiyo_server.experience_log import ExperienceSink, NullExperienceLog
from tamiyo_server.metrics import RULE_NAMES, ServerMetrics, child
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy
from tamiyo_server.session import FrameRef, budget_rules, deadline_s, new_id
from tamiyo_server.validation import validate_decide_decoded


class Evaluated(NamedTuple):
    """What a batch hands back for one graph."""

    graph: GraphTensors
    output: PolicyOutput
    policy: ServedPolicy


RULES_CACHE_SIZE = 256
"""Distinct rule configs kept in ``DecisionPipeline.rules_cache`` (least recently used
first out). Why bounded: a Decide or SessionOpen chooses its own budget, so an unbounded
cache grew ~1.2 KB per distinct budget a client sent (review 15: 20,000 budgets, +24 MB).
A session holds its own rules, so evicting one only means the next session with that
budget builds a new one (~10 µs)."""

WITH_POLICY_CACHE_SIZE = 1024
"""(rules, policy version) pairs kept in ``DecisionPipeline._with_policy`` (LRU): one per
rule config in use per hot-reloaded policy."""


class DecisionPipeline:
    """Owns the batcher; turns batch results into decisions and records metrics."""

    def __init__(self, config: ServerConfig, holder: PolicyHolder, metrics: ServerMetrics) -> None:
        self.config = config
        self.holder = holder
        self.m = metrics
        run_on = config.batch.run_on
        if run_on == "auto":
            run_on = "thread" if holder.current.engine.device.type == "cuda" else "loop"
        self.batcher: Batcher[GraphSnapshot, Evaluated] = Batcher(
            self._run_batch,
            replace(config.batch, run_on=run_on),
            metrics,
            prepare_shed=featurize_many,
        )
        # rule config -> its rules, LRU (see RULES_CACHE_SIZE)
        self.rules_cache: OrderedDict[RuleConfig, DecisionRules] = OrderedDict()
        # (id of a session's rules, policy version) -> (those rules, with the policy's), LRU
        self._with_policy: OrderedDict[tuple[int, str], tuple[DecisionRules, DecisionRules]] = (
            OrderedDict()
        )
        self.closing = False
        self.door = Door(config.batch, self.batcher, metrics)  # what is admitted when busy
        # Large Decide states are decoded on one thread, behind a bounded queue (late
        # binding of _decode: tests wrap it).
        self.decodes = DecodeQueue(config.batch, self.door, metrics, lambda r: self._decode(r))
        # Experience log (tamiyo_server.experience_log); the app installs a real one.
        self.experience: ExperienceSink = NullExperienceLog()

    @property
    def running(self) -> bool:
        """``start`` ran (so there is a batcher to drain and stop)."""
        return self.door.running

    def start(self) -> None:
        self.batcher.start()
        self.door.start()

    async def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the load monitor and the batcher (queued work runs first). Waits at most
        ``timeout_s`` (s) for the inference thread (see ``Batcher.stop``); False when it
        was still in a batch then (left behind)."""
        self.decodes.stop()
        await self.door.stop()
        if self.batcher.on_loop:
            return self.batcher.stop()
        return await asyncio.to_thread(self.batcher.stop, timeout_s)

    def calibrate(self, rounds: int = 3) -> None:
        """Seed the batcher's cost model with measured batches of synthetic graphs, so
        the first real deadlines are judged by this machine's speed, not by the prior
        (run before serving, off the event loop)."""
        rng = np.random.default_rng(0)
        # (graphs, nodes each). Single small graphs first: the common case at low load,
        # and what decides whether a fresh session's first decision is shed (see
        # CostModel.fit); then batches up to a few thousand nodes, three times as many
        # shapes as the fit has coefficients.
        shapes = (
            (1, 4),
            (1, 16),
            (1, 64),
            (4, 16),
            (2, 100),
            (1, 300),
            (16, 16),
            (8, 64),
            (32, 32),
        )
        window = self.holder.current.schema.window
        batches = [[random_snapshot(rng, n, window=window) for _ in range(b)] for b, n in shapes]
        for snaps in batches:  # first call per shape pays one-off costs; not measured
            self._run_batch(snaps)
        took: list[list[float]] = [[] for _ in batches]
        for _ in range(rounds):
            for i, snaps in enumerate(batches):
                t0 = time.monotonic()
                self._run_batch(snaps)
                took[i].append((time.monotonic() - t0) * 1000.0)
        # the median per shape: one preempted batch must not set the model
        self.batcher.cost.fit(
            [
                (sum(s.topology.num_nodes for s in snaps), len(snaps), float(np.median(ms)))
                for snaps, ms in zip(batches, took, strict=True)
            ]
        )

    # --------------------------------------------- batches (loop or inference thread)
    def _run_batch(self, snaps: Sequence[GraphSnapshot]) -> list[Evaluated]:
        """Featurize + one batched forward; the policy is read once per batch so a
        hot swap never splits a batch."""
        served = self.holder.current
        graphs = featurize_many(snaps)
        outs = served.engine.infer(graphs)
        return [Evaluated(g, o, served) for g, o in zip(graphs, outs, strict=True)]

    # ------------------------------------------------------------------ event loop
    def submit(
        self, snap: GraphSnapshot, edges: int, arrival: float, deadline: float
    ) -> Job[GraphSnapshot, Evaluated] | None:
        if self.closing:
            return None
        return self.batcher.submit(snap, snap.topology.num_nodes, edges, arrival, deadline)

    def _decode(self, req: pb.DecideRequest) -> GraphSnapshot:
        """Validate a Decide request (raises ValidationError) and make its snapshot."""
        info, cols = validate_decide_decoded(req, self.config.limits)  # decoded once, used twice
        topo = info.graph_topology(req.state.topology)  # (from the arrays validation decoded)
        return snapshot_from_state(req.state, self.holder.current.schema.window, cols, topo)

    def rules_for(self, cfg: RuleConfig) -> DecisionRules:
        """One DecisionRules per distinct rule config (sessions share them), the last
        ``RULES_CACHE_SIZE`` used kept."""
        cache = self.rules_cache
        rules = cache.get(cfg)
        if rules is None:
            rules = cache[cfg] = DecisionRules(cfg)
            if len(cache) > RULES_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(cfg)
        return rules

    def policy_rules(self, served: ServedPolicy) -> RuleConfig:
        """The server's rules with the values ``served`` declares (its checkpoint's
        ``serving_rules``), except those the operator set (GetPolicyInfo shows these)."""
        declared = dict(served.serving_rules)
        return rules_for_policy(self.config.rules, declared, self.config.operator_rules)

    def with_policy(self, rules: DecisionRules, served: ServedPolicy) -> DecisionRules:
        """A session's ``rules`` with the values the policy that made the output declares
        (see ``policy_rules``): the rules follow the policy across hot reloads, so a
        stream opened under one checkpoint is decided by the next one's rules."""
        if not served.serving_rules:
            return rules
        # (An entry holds its ``rules``, so no other object can take that id while the
        # entry lives; the ``is`` check is a second guard against a stale answer.)
        cache = self._with_policy
        key = (id(rules), served.version)
        hit = cache.get(key)
        if hit is None or hit[0] is not rules:
            cfg = rules_for_policy(
                rules.config, dict(served.serving_rules), self.config.operator_rules
            )
            hit = cache[key] = (rules, self.rules_for(cfg))
            if len(cache) > WITH_POLICY_CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return hit[1]

    def decision(
        self,
        done: Done[Evaluated] | None,
        snap: GraphSnapshot,
        rules: DecisionRules,
        state: RuleState,
        frame: FrameRef,
        path: str,
        shed_reason: str = "",
        into: decision_pb2.AdaptationDecision | None = None,
    ) -> decision_pb2.AdaptationDecision:
        """Apply the rules to a batch result, or the rules-only fallback when the work
        was shed (``done`` None or ``done.shed`` set), and build the proto: in ``into``
        when given (a stream builds it inside its response: wrapping a finished decision
        copies it, ~8 µs for 36 layer scores on a quiet box)."""
        ev = done.result if done is not None else None
        reason = shed_reason or (done.shed if done is not None else "") or "unknown"
        if ev is None:
            pre = done.prepared if done is not None else None
            g = pre if isinstance(pre, GraphTensors) else featurize(snap)
            rd = rules.fallback(g, state, snap.step, snap.epoch)
            version = self.holder.current.version
            child(self.m.shed, reason).inc()
            out = None
        else:
            g, out = ev.graph, ev.output
            rd = self.with_policy(rules, ev.policy).decide(out, g, state, snap.step, snap.epoch)
            self.door.network_count += 1
            version = ev.policy.version
        msg = _build(rd, g, out, version, frame, into)
        if ev is None:
            msg.reason = f"{msg.reason} [shed: {reason}]"
        now = time.monotonic()
        latency = now - frame.arrival
        msg.server_latency_us = min(int(latency * 1e6), 2**32 - 1)
        degraded = "true" if rd.degraded else "false"
        child(self.m.decision_seconds, path, degraded).observe(latency)
        if frame.asked is not None:
            child(self.m.e2e_seconds, degraded).observe(now - frame.asked)
        child(self.m.decisions, RULE_NAMES.get(rd.rule, "UNKNOWN")).inc()
        return msg

    async def decide_unary(
        self, req: pb.DecideRequest, time_remaining_s: float | None
    ) -> decision_pb2.AdaptationDecision:
        """The Decide RPC: validate (raises ValidationError), batch, rules, proto.
        Raises ``RefusedError`` when it cannot be queued (inference queue full, decode
        queue full or too slow for the budget: see ``tamiyo_server.decode_queue``); a missed
        deadline gives a degraded decision."""
        arrival = time.monotonic()
        budget = deadline_s(self.config.batch, req.budget)
        if time_remaining_s is not None:
            budget = min(budget, time_remaining_s)
        if len(req.state.signals) > OFFLOAD_SIGNALS:
            if self.closing:  # (no decode work for an answer nobody will wait for)
                raise RefusedError("UNAVAILABLE", SHUTTING_DOWN)
            snap = await self.decodes.decode(req, arrival, budget)
        else:
            snap = self._decode(req)
        if self.closing:
            raise RefusedError("UNAVAILABLE", SHUTTING_DOWN)
        rules = self.rules_for(budget_rules(self.config.rules, req.budget))
        frame = FrameRef(0, int(req.state.epoch), req.request_id, arrival)
        if time.monotonic() >= arrival + budget:
            # The decode used up the budget: the batcher would only shed it (as "deadline")
            # after a queue slot and a wait; answer from the rules now.
            msg = self.decision(None, snap, rules, RuleState(), frame, "unary", "deadline")
            self.experience.unary(req.state, msg)
            return msg
        job = self.submit(snap, len(req.state.topology.edges), arrival, arrival + budget)
        if job is None:
            child(self.m.shed, "queue_full").inc()
            raise RefusedError(
                "RESOURCE_EXHAUSTED",
                f"inference queue full ({self.config.batch.max_queued} graphs); retry later",
                self.door.pushback_ms(self.batcher.backlog_ms()),
            )
        try:
            done = await job.future
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        msg = self.decision(done, snap, rules, RuleState(), frame, "unary")
        self.experience.unary(req.state, msg)
        return msg


def _build(
    rd: RuleDecision,
    g: GraphTensors,
    out: PolicyOutput | None,
    version: str,
    frame: FrameRef,
    into: decision_pb2.AdaptationDecision | None = None,
) -> decision_pb2.AdaptationDecision:
    msg = decision_pb2.AdaptationDecision() if into is None else into
    msg.decision_id = new_id("d")
    msg.action = rd.action
    msg.target_layer_id = rd.layer_id
    msg.seed_index = max(rd.seed, 0)
    msg.kernel_id = rd.kernel_id
    msg.reason = rd.reason
    msg.rule = rd.rule
    msg.policy_version = version
    msg.degraded = rd.degraded
    msg.propensity = rd.propensity
    msg.frame_step = frame.step
    msg.frame_request_id = frame.request_id
    if out is not None:
        msg.confidence = out.adapt_prob + 0.0  # (-0.0 + 0.0 is 0.0: 1 - P(no-op) can be -0)
        msg.urgency = out.urgency
        msg.value_estimate = out.value
        msg.MergeFromString(layer_scores_bytes(g.layer_ids, out.target_probs))
    return msg


class _ScoreTemplate(NamedTuple):
    buf: npt.NDArray[np.uint8]  # every LayerScore of the graph, floats zeroed
    float_at: npt.NDArray[np.int64]  # [N*4] byte positions of the N float32 values


_TEMPLATES: OrderedDict[tuple[str, ...], _ScoreTemplate] = OrderedDict()  # LRU
_TEMPLATE_BYTES = [0]  # their total size (``_template_bytes``)
MAX_TEMPLATE_BYTES = 32 * 1024 * 1024
"""Bound on the layer-score templates kept (bytes, least recently used first out). Why
by size: topologies are the clients' and a 512-layer one with 128-character ids makes
a ~180 KB template (with its key), so a bound on the count (4,096, then all cleared at once) allowed
~350 MB and a burst of rebuilds. 32 MB keeps ~190 of the largest, thousands of usual
ones; a miss costs ~1 µs per layer."""


def _template_bytes(layer_ids: tuple[str, ...], t: _ScoreTemplate) -> int:
    """What a cached template holds (bytes): its arrays and its key's characters."""
    return t.buf.nbytes + t.float_at.nbytes + sum(map(len, layer_ids)) + 64 * len(layer_ids)


def _template(layer_ids: tuple[str, ...]) -> _ScoreTemplate:
    t = _TEMPLATES.get(layer_ids)
    if t is not None:
        _TEMPLATES.move_to_end(layer_ids)
    else:
        parts: list[bytes] = []
        at: list[int] = []
        pos = 0
        for lid in layer_ids:
            b = lid.encode()
            inner = b"\x0a" + varint(len(b)) + b + b"\x15"  # layer_id = 1; float = 2 (fixed32)
            head = b"\x4a" + varint(len(inner) + 4) + inner  # layer_scores = 9
            at.append(pos + len(head))
            parts.append(head + b"\x00\x00\x00\x00")
            pos += len(head) + 4
        buf = np.frombuffer(b"".join(parts), np.uint8)
        float_at = (np.array(at, np.int64)[:, None] + np.arange(4)).reshape(-1)
        t = _TEMPLATES[layer_ids] = _ScoreTemplate(buf, float_at)
        _TEMPLATE_BYTES[0] += _template_bytes(layer_ids, t)
        while _TEMPLATE_BYTES[0] > MAX_TEMPLATE_BYTES and len(_TEMPLATES) > 1:
            old_ids, old = _TEMPLATES.popitem(last=False)
            _TEMPLATE_BYTES[0] -= _template_bytes(old_ids, old)
    return t


def layer_scores_bytes(layer_ids: tuple[str, ...], probs: npt.ArrayLike) -> bytes:
    """``AdaptationDecision.layer_scores`` (one LayerScore per layer, in order) as wire
    bytes to merge into the message.

    Why: building N LayerScore messages in Python cost ~3 µs per layer on the event
    loop (~100 µs per 32-layer decision); the wire form per topology is cached and only
    the N float32 values are written per decision (one numpy scatter).
    """
    t = _template(layer_ids)
    buf = t.buf.copy()
    buf[t.float_at] = np.asarray(probs, "<f4").reshape(-1).view(np.uint8)
    return buf.tobytes()
