"""Every limit and tunable of Tamiyo, in one place.

Server, trainer, simulator and client import these dataclasses instead of defining
their own constants. Defaults are chosen for a 10 ms decision budget on a 2-core CPU
machine; the server's CLI flags and ``TAMIYO_*`` environment variables override them
(see ``tamiyo_server.cli``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Limits:
    """Input limits. Anything beyond them is refused with an error naming the field."""

    max_message_bytes: int = 4 * 1024 * 1024
    max_nodes_per_graph: int = 512
    max_edges_per_graph: int = 4096
    max_signals_per_frame: int = 1024
    max_signals_per_state: int = 16384  # ModelGraphState: history windows of all layers
    max_kernels: int = 64
    max_seeds_per_layer: int = 64
    max_id_chars: int = 128
    max_request_id_chars: int = 64
    max_detail_chars: int = 256
    max_concurrent_streams: int = 4096


@dataclass(frozen=True)
class RuleConfig:
    """The decision rules applied after the network (the seed's rules, made explicit)."""

    confidence_threshold: float = 0.5  # adapt only if P(adapt) >= this
    health_threshold: float = 0.6  # the network may adapt only a layer below this health
    # Separate from health_threshold so that turning the network's veto off (1.0, what the
    # trained policy wants: it repairs before health drops) does not make every shed
    # decision adapt something.
    fallback_health_threshold: float = 0.6  # rules-only fallback adapts below this health
    max_adaptations_per_epoch: int = 2
    layer_cooldown_steps: int = 50
    exploration_epsilon: float = 0.0  # ε-exploration; off by default in the server


OTHER_VARIABLES: Mapping[str, str] = {
    "TAMIYO_DEFAULT_CHECKPOINT_DIR": "tamiyo/policy/builtin.py: where the bundled default "
    "policy is when the package is installed without it (the image sets it)",
    "TAMIYO_TOKEN": "tamiyo_client/security.py (tamiyo-demo, tamiyo-loadgen): the bearer "
    "token they send; else they send TAMIYO_AUTH_TOKEN",
    "TAMIYO_MARCH": "setup.py, at build time: the instruction set of the C modules",
    "TAMIYO_FUZZ_EXAMPLES": "tests/reliability/test_fuzz.py: examples per fuzzer",
}
"""``TAMIYO_*`` variables of the project that are not server flags (those are
``TAMIYO_<FLAG>``, see ``tamiyo_server.cli``): name -> who reads it. Why listed: the
server warns about an unknown ``TAMIYO_*`` variable (a typo in a manifest is otherwise
silently ignored), and these are known, set in the same shells and images."""


POLICY_RULES = ("confidence_threshold", "health_threshold")
"""The rules whose right value depends on the policy behind them, so a checkpoint's
manifest may declare them (``serving_rules``: the values its served score was validated
with). Why: the health veto keeps an untrained network off healthy layers, but the
trained policy repairs a fault before reported health drops, and served with the veto it
scored ~71 instead of ~93 (trainer/README.md). The per-epoch and cooldown budgets are
the host's and the operator's, never the checkpoint's."""


def check_serving_rules(declared: object) -> dict[str, float]:
    """A manifest's ``serving_rules``: a JSON object of ``POLICY_RULES`` names to numbers
    in [0, 1]. Raises ValueError naming what is wrong."""
    if not isinstance(declared, Mapping):
        raise ValueError(f"serving_rules is {type(declared).__name__}, not an object")
    out: dict[str, float] = {}
    for name, value in declared.items():
        if name not in POLICY_RULES:
            raise ValueError(f"serving_rules.{name}: not one of {', '.join(POLICY_RULES)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"serving_rules.{name}: {value!r} is not a number in [0, 1]")
        out[str(name)] = float(value)
    return out


def rules_for_policy(
    base: RuleConfig, declared: Mapping[str, float], fixed: Collection[str]
) -> RuleConfig:
    """``base`` with a policy's declared ``serving_rules``, except the rules in ``fixed``
    (those the operator set: a flag or ``TAMIYO_*`` variable wins over the checkpoint)."""
    over: dict[str, object] = {k: v for k, v in declared.items() if k not in fixed}
    return replace(base, **over) if over else base  # type: ignore[arg-type]


@dataclass(frozen=True)
class BatchConfig:
    """Deadline-aware dynamic batching (the rules: ``tamiyo_server.batch_queue``), and the
    admission of work on the event loop (``tamiyo_server.door``)."""

    decision_deadline_ms: float = 10.0  # end-to-end budget per decision
    max_deadline_ms: float = 1000.0  # cap on a session's requested deadline
    # Floor on a session's requested deadline: below it the transport and one batch's
    # work leave no room on a quiet CPU, so every frame would be shed as overloaded (this
    # box, one stream at 100 frames/s, 16-layer hosts: shed 17-21 % at 2 ms, 9-11 % at
    # 3 ms, <= 0.4 % at 5 ms; at 1 ms most were).
    min_deadline_ms: float = 3.0
    max_batch_graphs: int = 256
    max_batch_nodes: int = 16384
    max_batch_edges: int = 65536
    max_queue_delay_ms: float = 2.0  # a batch never waits longer than this to fill
    max_queued: int = 8192  # evaluations waiting for a batch
    outbound_queue: int = 64  # responses waiting to be written on one stream
    # Online inference-time model (tamiyo_server.cost_model.CostModel): prior until measured.
    prior_batch_ms: float = 1.0  # fixed cost of one batch before any measurement
    prior_node_us: float = 5.0  # cost per node before any measurement
    cost_forgetting: float = 0.98  # per-batch forgetting factor of the online fit
    safety_ms: float = 0.5  # slack kept for writing the answer after inference
    # Pushback on overload refusals (StreamError.retry_after_ms, gRPC's
    # grpc-retry-pushback-ms on Decide): the predicted drain time, within these bounds.
    min_pushback_ms: float = 10.0  # shortest pushback on an overload refusal
    max_pushback_ms: float = 1000.0  # longest pushback on an overload refusal
    # Transit waits from TelemetryFrame.client_clock_us (tamiyo_server.transit): the
    # zero-wait baseline is the smallest offset over this window (s; a lasting shift of
    # the offset reads as a wait for at most this long), and below this CPU share the
    # server is taken to be keeping up, so a frame that looks late is re-based, not refused.
    transit_window_s: float = 30.0  # s over which a stream's smallest transit offset counts
    transit_idle_utilization: float = 0.5  # CPU share below which a too-late frame re-bases
    # Large Decide states (over decode_queue.OFFLOAD_SIGNALS signals) are decoded
    # one at a time on one thread, ~4 µs per signal (this 2-core box: 4,096 signals 15-18
    # ms, 16,384 signals 68 ms). Beyond max_decodes in flight (waiting or decoding), or when
    # the predicted wait for the thread (the signals in flight × the measured µs per
    # signal) plus the queued inference exceeds the request's budget, a Decide is refused
    # RESOURCE_EXHAUSTED with pushback instead of queuing (each waiting call holds its
    # request, up to max_message_bytes, and would come back degraded anyway).
    max_decodes: int = 8  # large Decide requests decoding or waiting to; more are refused
    decode_prior_us: float = 4.0  # µs per signal of a Decide decode until one is measured
    # SessionOpens are validated and their sessions built on the event loop (~0.3 ms for a
    # small host, 2-6 ms at the limits on the CI box), one at a time, and open work may
    # use at most open_loop_share of the loop: an open that took c ms is followed by
    # c·(1/share − 1) ms without opens (tamiyo_server.open_admission). Why: each stream
    # is paced alone, and 20 streams re-opening in a loop held most of the loop (a healthy
    # stream's p99 went from ~3 ms to 20-180 ms, frames shed). An open that would wait
    # longer than max_open_wait_ms for its turn is refused RESOURCE_EXHAUSTED with
    # pushback: in-stream for a re-open (the session in force stays), as the call's
    # status for a stream's first open (the client reconnects after its backoff). The
    # bound stays below the client's connect_timeout_s (5 s), so an admitted first open
    # is answered before its client gives up. Measured on the loaded CI box: 20 streams
    # re-opening got 23 % of the loop (51-54 % before; the healthy stream's p50 stayed at
    # its baseline); 2,000 fresh 64-layer hosts opening at once were all accepted in
    # 6.7 s (3.6 s unpaced), or in 14 s with 769 opens refused and retried when busier.
    open_loop_share: float = 0.25  # fraction of the event loop SessionOpen work may use
    max_open_wait_ms: float = 3000.0  # longest wait (ms) for an open's turn; then refused
    # "loop": no GIL hand-offs between loop and inference, best on CPU; "thread":
    # overlaps device time on CUDA (see tamiyo_server.batcher: "Where batches run").
    run_on: str = "auto"  # where batches run: "loop", "thread", "auto" (thread on CUDA)

    def __post_init__(self) -> None:
        """Refuse knobs the batcher cannot work with (ValueError naming the field): a 0 ms
        deadline divided by zero at the door, 0 graphs per batch spun the loop."""
        positive = (
            "decision_deadline_ms",
            "max_batch_graphs",
            "max_batch_nodes",
            "max_batch_edges",
            "outbound_queue",
            "prior_batch_ms",
            "min_pushback_ms",
            "transit_window_s",
            "max_decodes",
            "decode_prior_us",
        )
        for name in positive:
            if not getattr(self, name) > 0:  # (also refuses NaN)
                raise ValueError(f"BatchConfig.{name}: {getattr(self, name)} must be > 0")
        for name in (
            "max_queue_delay_ms",
            "max_queued",
            "prior_node_us",
            "safety_ms",
            "max_open_wait_ms",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"BatchConfig.{name}: {getattr(self, name)} must be >= 0")
        if not self.max_deadline_ms >= self.decision_deadline_ms:
            raise ValueError(
                f"BatchConfig.max_deadline_ms: {self.max_deadline_ms} is below "
                f"decision_deadline_ms {self.decision_deadline_ms}"
            )
        if not 0 < self.min_deadline_ms <= self.decision_deadline_ms:
            raise ValueError(
                f"BatchConfig.min_deadline_ms: {self.min_deadline_ms} not in (0, "
                f"decision_deadline_ms {self.decision_deadline_ms}]"
            )
        if not self.max_pushback_ms >= self.min_pushback_ms:
            raise ValueError(
                f"BatchConfig.max_pushback_ms: {self.max_pushback_ms} is below "
                f"min_pushback_ms {self.min_pushback_ms}"
            )
        if not 0.0 < self.cost_forgetting < 1.0:
            raise ValueError(f"BatchConfig.cost_forgetting: {self.cost_forgetting} not in (0, 1)")
        if not 0.0 < self.open_loop_share <= 1.0:
            raise ValueError(f"BatchConfig.open_loop_share: {self.open_loop_share} not in (0, 1]")
        if not 0.0 <= self.transit_idle_utilization <= 1.0:
            raise ValueError(
                f"BatchConfig.transit_idle_utilization: {self.transit_idle_utilization} "
                "not in [0, 1]"
            )
        if self.run_on not in ("auto", "loop", "thread"):
            raise ValueError(f"BatchConfig.run_on: {self.run_on!r} not auto, loop or thread")


@dataclass(frozen=True)
class ExperienceLogConfig:
    """The server's experience log (``tamiyo_server.experience_log``); off when ``dir`` is
    empty. Files are ``<dir>/<prefix>-<UTC start>-<pid>[-NNNN].sqlite``; rotation starts a
    new file past ``max_file_mb`` / ``max_file_age_s``; retention deletes the oldest
    idle files (any replica's) past ``max_total_mb`` or ``max_age_s`` (0 = no limit)."""

    dir: str = ""
    prefix: str = "tamiyo"
    flush_interval_s: float = 1.0  # a kill -9 loses at most this much (s)
    max_queue: int = 16384  # events waiting for the writer thread; more are dropped
    max_file_mb: float = 256.0
    max_file_age_s: float = 3600.0
    max_total_mb: float = 0.0
    max_age_s: float = 0.0
    idle_s: float = 60.0  # a file unmodified this long is closed (safe to delete)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    # The metrics endpoint is plaintext HTTP without authentication whatever the gRPC
    # port's TLS and token: give it a private address when host is a public one.
    metrics_host: str = ""  # address of the metrics endpoint; empty = the same as host
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    checkpoint_dir: str = ""  # empty, or no checkpoint in it yet: the bundled default policy
    poll_interval_s: float = 1.0
    # Serve exactly this checkpoint (a directory, or a version in checkpoint_dir) and turn
    # hot reload off; empty = follow checkpoint_dir/latest (tamiyo_server.reload).
    pin_checkpoint: str = ""
    grace_s: float = 5.0
    torch_threads: int = 1  # torch intra-op threads for batches (see policy.engine)
    # Security (tamiyo_server.auth); empty = off. The token is read from the
    # TAMIYO_AUTH_TOKEN environment variable or --auth-token-file, never a flag value.
    auth_token: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # set = mTLS (client certificates required)
    keepalive_time_ms: int = 10_000
    keepalive_timeout_ms: int = 5_000
    limits: Limits = field(default_factory=Limits)
    rules: RuleConfig = field(default_factory=RuleConfig)
    # (see POLICY_RULES; tamiyo_server.cli fills it from the flags and variables given)
    operator_rules: frozenset[str] = frozenset()  # rules a checkpoint may not override
    batch: BatchConfig = field(default_factory=BatchConfig)
    experience: ExperienceLogConfig = field(default_factory=ExperienceLogConfig)


@dataclass(frozen=True)
class ClientConfig:
    """The streaming client (``tamiyo_client.client``): reconnects, buffers, deadlines."""

    target: str = "127.0.0.1:50051"
    connect_timeout_s: float = 5.0  # per connection attempt (channel ready + SessionAccepted)
    backoff_initial_s: float = 0.1  # first reconnect delay
    # Cap on the reconnect delay: ≤ 1 s so a host resumes within ~1 s of a restarted server
    # being ready (make soak checks 2 s); jitter spreads a fleet's reconnects.
    backoff_max_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.5  # delay drawn uniformly from [d·(1-jitter), d]
    frame_buffer: int = 8  # frames waiting to be sent; more are coalesced (latest wins)
    outcome_buffer: int = 256  # outcomes waiting to be sent; oldest dropped beyond this
    decision_buffer: int = 256  # received decisions not yet consumed; oldest dropped beyond
    decision_deadline_ms: int = 0  # asked of the server in SessionBudget; 0 = server default
    keepalive_time_ms: int = 10_000  # detects a dead server within seconds
    keepalive_timeout_ms: int = 5_000
    # Encoding of frames handed over as FrameData (done on the client's thread): "columns"
    # (HealthSignalColumns, cheaper for the server to decode), "message" (one HealthSignal
    # per layer, readable) or "auto": columns from columns_min_signals signals per frame
    # up. Measured on the CI box: columns cost ~110-170 µs per frame whatever its size,
    # messages ~5.5 µs per signal, and the client's thread competes with the training
    # thread for the GIL. A TelemetryFrame passed in is sent as it is.
    signal_form: str = "auto"  # columns | message | auto: how FrameData is encoded
    columns_min_signals: int = 24  # auto: columns from this many signals per frame up


@dataclass(frozen=True)
class KasminaConfig:
    """The reference KasminaLayer (``tamiyo_client.kasmina``): telemetry and seeds.

    The health score is ``(1 - dead) · (1 - corr_weight·corr) · var/(var + variance_floor)
    · g/(g + gradient_floor) · error_decay**errors`` (see ``tamiyo_client.telemetry``).
    """

    num_seeds: int = 4
    window: int = 32  # forward passes kept for the latency mean/variance
    max_corr_units: int = 64  # correlation uses at most this many output units
    variance_floor: float = 1e-3  # activation variance at which the variance factor is 0.5
    gradient_floor: float = 1e-5  # gradient norm at which the gradient factor is 0.5
    corr_weight: float = 0.5  # fully correlated units halve the health
    error_decay: float = 0.5  # each non-finite forward in the window halves the health
    memory_budget_bytes: int = 256 * 1024 * 1024  # memory_utilization denominator
    fossilize_after_steps: int = 200  # training forwards before a seed is fossilized (frozen)
    # Activations, non-finite outputs and gradient norms are measured on every Nth training
    # forward (the first included), counted across reporting windows so that a frame every
    # step does not mean a measurement every step; latency on every forward. On small
    # models a measurement costs more than the layer itself (~0.3 ms per layer per sample
    # on the 2-core CI box, output stats + their reduction), so 1 in 16 keeps the average
    # cost per step small (bench: python -m bench --only client).
    sample_every: int = 16
    # On a device where reading a value syncs (CUDA), the seeds' failure flags are read and
    # failed seeds culled every Nth training forward (counted like sample_every): one sync
    # per N forwards per layer; a failed kernel is left out of the output and the
    # gradients until then. On the CPU a failed seed is culled at once. A data-parallel
    # job attached with a process_group culls at host.sync_seeds() instead (README,
    # "Multi-rank training"), the same step on every rank.
    cull_check_every: int = 16
    # Removed (session 16): an all-reduce inside forward, which hung pipeline stages,
    # LayerDrop/MoE and DDP.join. True is refused with the replacement named
    # (KasminaHost.attach(process_group=...) and host.sync_seeds()); kept so that old code
    # gets that message instead of an unexpected-keyword TypeError.
    replicated_ranks: bool = False
    # A sampled output contributes at most this many rows (evenly strided over the batch)
    # to the activation statistics; the non-finite check covers all rows. 0 = all rows.
    sample_rows: int = 64


@dataclass(frozen=True)
class SimicConfig:
    """The Simic simulator (``trainer.simic``): dynamics, costs, telemetry noise.

    Time unit: one decision step = ``host_steps_per_decision`` host training steps; rates
    are intrinsic damage per decision step; costs and penalties are in reward units
    (reward per step = mean true layer health in [0, 1] minus costs).
    """

    horizon: int = 40  # decision steps per episode
    host_steps_per_decision: int = 10
    host_steps_per_epoch: int = 100
    window: int = 8  # signals per layer kept for the featurizer (= FeatureSchema.window)
    train_sizes: tuple[int, int] = (4, 32)  # layers per graph, inclusive
    unseen_sizes: tuple[int, int] = (40, 64)  # evaluation only: sizes never trained on
    dag_probability: float = 0.6  # else a plain chain
    skip_edge_probability: float = 0.6
    fault_count_probs: tuple[float, ...] = (0.1, 0.5, 0.3, 0.1)  # P(0, 1, 2, 3 faults)
    fault_rate_range: tuple[float, float] = (0.02, 0.06)  # damage per decision step
    onset_range: tuple[int, int] = (2, 24)  # decision step where a fault starts
    propagation: float = 0.9  # downstream health loss per unit of upstream loss
    kernel_ids: tuple[str, ...] = ("residual_adapter_r4", "residual_adapter_r32")
    kernel_parameter_counts: tuple[int, ...] = (4096, 32768)
    kernel_cost: tuple[float, ...] = (0.15, 0.35)  # reward units, paid when loaded
    kernel_delay: tuple[int, ...] = (4, 2)  # decision steps until the kernel repairs
    wrong_layer_penalty: float = 0.1  # adapting a layer with no (unrepaired) fault
    over_budget_penalty: float = 0.5  # each adaptation beyond the per-epoch budget
    max_adaptations_per_epoch: int = 2
    health_noise: float = 0.04  # std of reported health_score
    dead_noise: float = 0.02  # std of reported dead_neuron_ratio
    drop_probability: float = 0.03  # a layer's signal missing from a frame
    behaviour_epsilon: float = 0.1  # ε of the logged behaviour policy


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of the offline trainer (``python -m trainer``), in one place.

    Overridable from a JSON/TOML file (``--config``) and CLI flags; stored in every
    checkpoint's provenance. Rewards are shifted by ``reward_offset`` (a constant per
    step does not change which action is best at a fixed horizon, and centres Q near 0).
    """

    algo: str = "iql"  # "iql" (default), "bc" or "cql"
    seed: int = 0
    steps: int = 2000  # gradient steps (validation: 2500 was worse for 2 of 3 IQL seeds)
    batch_size: int = 48  # graphs (transitions) per step, per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 10.0  # per loss term (an actor's policy / value head; a critic's one)
    gamma: float = 0.9  # a repair pays off within ~10 decisions
    reward_offset: float = -1.0
    target_tau: float = 0.02  # Polyak rate of the target critic
    iql_expectile: float = 0.8
    # Inverse temperature of advantage-weighted regression. The greedy AWR policy is
    # argmax μ(a|s)·exp(β·A): an early repair that the ε-behaviour takes with μ ≈ 0.004
    # (vs 0.9 for no-op) wins only if β·A > ln(0.9/0.004) ≈ 5.4, i.e. A > 0.18 at β = 30
    # (A > 0.54 at the old β = 10, which only late repairs reach). Weights clip at 1000.
    iql_beta: float = 30.0
    iql_max_weight: float = 1000.0
    # AWR weight ÷ μ(a|s)^α (μ = logged propensity): α = 1 removes the behaviour prior, whose
    # log-odds against an exploratory repair grow with the layer count (late repairs, worse
    # on unseen sizes). Validation (2000 steps, best step): α = 0 70-87, α = 1 89-92.
    iql_prior_power: float = 1.0
    # The health veto the published policy is served with (its manifest's serving_rules):
    # off, since it repairs before reported health drops (served with the 0.6 veto it
    # scored ~71 against ~93, trainer/README.md). Its "served" score is measured with it.
    served_health_threshold: float = 1.0
    cql_alpha: float = 0.5
    value_weight: float = 0.5  # actor's value head regressed on the critic's V (IQL)
    eval_every: int = 250  # steps between periodic evaluations (0 = only at the end)
    eval_episodes: int = 64  # validation episodes (seeds 2,000,000+, train sizes) per eval
    keep_best: bool = True  # checkpoint the weights with the best validation score
    checkpoint_every: int = 1000  # steps between resumable train-state saves
    device: str = "auto"  # "auto": CUDA when present, else CPU
    num_threads: int = 1  # torch CPU threads per process (1: no spin on a busy machine)
    # Experiment sizes for the pipeline (``make train``).
    data_episodes: int = 300  # behaviour episodes logged for training (train sizes)
    heldout_data_episodes: int = 60  # behaviour episodes logged for FQE only
    final_eval_episodes: int = 100  # per evaluation set (held-out seeds, unseen sizes)
    train_seeds: int = 3  # independent training seeds per algorithm
    algos: tuple[str, ...] = ("bc", "iql")  # trained and reported by the pipeline
    fqe_steps: int = 2000  # × target_tau 0.02 = 40 target time constants ≫ 1/(1 − γ)
    # FQE critics on all the data, averaged (seeds from ``seed``), and as many again on
    # bootstrap resamples of the episodes for the interval (trainer/README: FQE)
    fqe_members: int = 10
    workers: int = 2  # processes training in parallel (one torch thread each)


@dataclass(frozen=True)
class DemoConfig:
    """``make demo`` (``tamiyo_client.demo``): a small student MLP with one damaged block
    learning a random teacher; the same run with and without Tamiyo."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    in_features: int = 16
    width: int = 64
    teacher_width: int = 32
    damage_bias: float = -1.5  # hidden block bias set at the fault (2nd epoch): most units die
    steps_per_epoch: int = 250
    eval_every: int = 25  # steps between validation-loss points on the curves
    decision_every: int = 20  # steps between frames that ask for a decision
    reward_after_steps: int = 100  # outcome reward = relative val-loss change this later
    num_seeds: int = 4
    val_size: int = 2048
    # Asked of the server in SessionBudget. The training loop never waits for a decision,
    # so the demo gives the network 50 ms rather than the 10 ms default: on a busy 2-core
    # machine the default budget would make most answers rules-only fallbacks.
    decision_deadline_ms: int = 50
