"""Every limit and tunable of Tamiyo, in one place.

Server, trainer, simulator and client import these dataclasses instead of defining
their own constants. Defaults are chosen for a 10 ms decision budget on a 2-core CPU
machine; the server's CLI flags and ``TAMIYO_*`` environment variables override them
(see ``tamiyo_server.cli``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    health_threshold: float = 0.6  # adapt only a layer whose health is below this
    max_adaptations_per_epoch: int = 2
    layer_cooldown_steps: int = 50
    exploration_epsilon: float = 0.0  # ε-exploration; off by default in the server


@dataclass(frozen=True)
class BatchConfig:
    """Deadline-aware dynamic batching (see ``tamiyo_server.batcher``)."""

    decision_deadline_ms: float = 10.0  # end-to-end budget per decision
    max_deadline_ms: float = 1000.0  # cap on a session's requested deadline
    max_batch_graphs: int = 256
    max_batch_nodes: int = 16384
    max_batch_edges: int = 65536
    max_queue_delay_ms: float = 2.0  # a batch never waits longer than this to fill
    max_queued: int = 8192  # evaluations waiting for the inference thread
    outbound_queue: int = 64  # responses waiting to be written on one stream
    # Online inference-time model (tamiyo_server.batcher.CostModel): prior until measured.
    prior_batch_ms: float = 1.0  # fixed cost of one batch before any measurement
    prior_node_us: float = 5.0  # cost per node before any measurement
    cost_forgetting: float = 0.98  # per-batch forgetting factor of the online fit
    safety_ms: float = 0.5  # slack kept for writing the answer after inference


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    checkpoint_dir: str = ""  # empty: serve the bundled default policy
    poll_interval_s: float = 1.0
    grace_s: float = 5.0
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
    batch: BatchConfig = field(default_factory=BatchConfig)


@dataclass(frozen=True)
class ClientConfig:
    """The streaming client (``tamiyo_client.client``): reconnects, buffers, deadlines."""

    target: str = "127.0.0.1:50051"
    connect_timeout_s: float = 5.0  # per connection attempt (channel ready + SessionAccepted)
    backoff_initial_s: float = 0.1  # first reconnect delay
    backoff_max_s: float = 5.0  # cap on the reconnect delay
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.5  # delay drawn uniformly from [d·(1-jitter), d]
    frame_buffer: int = 8  # frames waiting to be sent; more are coalesced (latest wins)
    outcome_buffer: int = 256  # outcomes waiting to be sent; oldest dropped beyond this
    decision_buffer: int = 256  # received decisions not yet consumed; oldest dropped beyond
    decision_deadline_ms: int = 0  # asked of the server in SessionBudget; 0 = server default
    keepalive_time_ms: int = 10_000  # detects a dead server within seconds
    keepalive_timeout_ms: int = 5_000


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
