"""Command line and environment configuration of the server.

Each flag has a ``TAMIYO_<FLAG>`` environment variable (``--port`` ↔ ``TAMIYO_PORT``);
a flag given on the command line wins over the variable, which wins over the default in
``tamiyo.config``. Every value, from either source, is checked when parsed: a bad one
stops the server with one line naming the flag (argparse parses string defaults with
the flag's type, so a variable gets the flag's check too). The parser is the one
definition of flags and variables: ``--help``, the unknown-variable warning
(``tamiyo_server.environment``) and docs/configuration.md (docs/gen_reference.py) are
generated from it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path

from tamiyo.config import POLICY_RULES, RuleConfig, ServerConfig
from tamiyo_server.environment import HelpFormatter, env_name, epilog, unknown_variables

log = logging.getLogger(__name__)

_RULE_HELP = {
    "confidence_threshold": "the network adapts only when its P(adapt) is at least this",
    "health_threshold": "the network may adapt only a layer reporting health below this "
    "(1 = off: the shipped trained policy repairs faults before health drops, see "
    "trainer/README.md; the rules-only fallback keeps its own threshold)",
}
assert set(_RULE_HELP) == set(POLICY_RULES)


def _env(name: str, default: object) -> str:
    return os.environ.get(env_name(name), str(default))


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not in [{lo}, {hi}]")
        return v

    parse.__name__ = "int"  # (the type docs/gen_reference.py shows)
    return parse


def _number(lo: float, hi: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (or (lo, hi] with ``above``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low_ok = v > lo if above else v >= lo
        if not (math.isfinite(v) and low_ok and v <= hi):
            want = f"> {lo:g}" if above else f">= {lo:g}"
            raise argparse.ArgumentTypeError(
                f"{text} must be {want}" + (f" and <= {hi:g}" if math.isfinite(hi) else "")
            )
        return v

    parse.__name__ = "float"
    return parse


def device_type(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")
    return text


def run_on_type(text: str) -> str:
    if text not in RUN_ON:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, loop or thread")
    return text


RUN_ON = ("auto", "loop", "thread")
DEVICES = ("auto", "cpu", "cuda")  # (and cuda:N)


PORT = _int_in(0, 65535)
POSITIVE = _number(0.0, above=True)
NONNEGATIVE = _number(0.0)
FRACTION = _number(0.0, 1.0)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="tamiyo-server",
        description="Serve Tamiyo decisions.\n\nEvery flag has a TAMIYO_<FLAG> variable "
        "(--checkpoint-dir: TAMIYO_CHECKPOINT_DIR);\na flag given wins over its variable, "
        "which wins over the built-in default.",
        epilog=epilog(),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default=_env("host", d.host), help="address to bind")
    p.add_argument("--port", type=PORT, default=_env("port", d.port), help="0 = any")
    p.add_argument(
        "--metrics-port",
        type=PORT,
        default=_env("metrics_port", d.metrics_port),
        help="Prometheus port (plaintext HTTP, no authentication); 0 disables",
    )
    p.add_argument(
        "--metrics-host",
        default=_env("metrics_host", d.metrics_host),
        help="address of the metrics endpoint; empty = the --host address (give a "
        "private one when --host is public: the endpoint has no TLS and no token)",
    )
    p.add_argument(
        "--device", type=device_type, default=_env("device", d.device), help="auto, cpu or cuda[:N]"
    )
    p.add_argument(
        "--checkpoint-dir",
        default=_env("checkpoint_dir", d.checkpoint_dir),
        help="directory watched for new checkpoints (its 'latest' pointer); empty, or no "
        "checkpoint in it yet (the directory may not exist yet) = the bundled default "
        "policy; a path that is not a directory is refused",
    )
    p.add_argument(
        "--poll-interval-s",
        type=POSITIVE,
        default=_env("poll_interval_s", d.poll_interval_s),
        help="how often the checkpoint directory's 'latest' pointer is checked (s)",
    )
    p.add_argument(
        "--pin-checkpoint",
        default=_env("pin_checkpoint", d.pin_checkpoint),
        help="serve exactly this checkpoint (directory, or version in --checkpoint-dir) "
        "and turn hot reload off",
    )
    p.add_argument(
        "--grace-s", type=NONNEGATIVE, default=_env("grace_s", d.grace_s), help="shutdown grace"
    )
    p.add_argument(
        "--auth-token-file",
        default=_env("auth_token_file", ""),
        help="file holding the bearer token clients must send (TAMIYO_AUTH_TOKEN also works); "
        "unset = no token required",
    )
    p.add_argument("--tls-cert", default=_env("tls_cert", d.tls_cert_file), help="PEM chain")
    p.add_argument("--tls-key", default=_env("tls_key", d.tls_key_file), help="PEM key")
    p.add_argument(
        "--tls-client-ca",
        default=_env("tls_client_ca", d.tls_client_ca_file),
        help="PEM CA for client certificates: enables mTLS",
    )
    p.add_argument(
        "--deadline-ms",
        type=POSITIVE,
        default=_env("deadline_ms", d.batch.decision_deadline_ms),
        help="default decision deadline",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=NONNEGATIVE,
        default=_env("max_queue_delay_ms", d.batch.max_queue_delay_ms),
        help="longest a batch waits to fill",
    )
    p.add_argument(
        "--run-batches-on",
        type=run_on_type,
        default=_env("run_batches_on", d.batch.run_on),
        help="where batches run: the event loop, an inference thread, or auto (thread on "
        "CUDA, loop otherwise)",
    )
    for rule in POLICY_RULES:  # every rule a checkpoint may declare, the operator may set
        p.add_argument(
            "--" + rule.replace("_", "-"),
            type=FRACTION,
            default=_env(rule, getattr(d.rules, rule)),
            help=f"{_RULE_HELP[rule]}; when neither this flag nor its variable is set, a "
            "checkpoint's manifest may set it (serving_rules)",
        )
    p.add_argument(
        "--torch-threads",
        type=_int_in(1, 1024),
        default=_env("torch_threads", d.torch_threads),
        help="torch intra-op threads for batches",
    )
    _experience_flags(p, d)
    return p


def _experience_flags(p: argparse.ArgumentParser, d: ServerConfig) -> None:
    """Experience logging (tamiyo_server.experience_log) and ε-exploration."""
    x = d.experience
    p.add_argument(
        "--experience-dir",
        default=_env("experience_dir", x.dir),
        help="directory of the SQLite experience store; empty = logging off",
    )
    p.add_argument(
        "--flush-interval-s",
        type=POSITIVE,
        default=_env("flush_interval_s", x.flush_interval_s),
        help="experience commit interval: the most a kill -9 can lose (s)",
    )
    p.add_argument(
        "--exploration-epsilon",
        type=FRACTION,
        default=_env("exploration_epsilon", d.rules.exploration_epsilon),
        help="probability of a uniformly random admissible action (0 = off)",
    )
    for flag, default, unit in (
        ("max_file_mb", x.max_file_mb, "MB per store file before rotation"),
        ("max_file_age_s", x.max_file_age_s, "s per store file before rotation"),
        ("max_total_mb", x.max_total_mb, "MB of store files kept (retention)"),
        ("max_age_s", x.max_age_s, "s an idle store file is kept (retention)"),
    ):
        p.add_argument(
            f"--experience-{flag.replace('_', '-')}",
            type=NONNEGATIVE,
            default=_env(f"experience_{flag}", default),
            help=f"{unit}; 0 = no limit",
        )


def _token(a: argparse.Namespace) -> str:
    """The token comes from a file or the environment, never from argv (ps shows argv).
    A variable set but blank is refused, as an empty file is: a Kubernetes Secret with an
    empty key does that, and the server would otherwise run open without saying so."""
    if a.auth_token_file:
        try:
            token = Path(a.auth_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"--auth-token-file {a.auth_token_file}: {exc}") from None
        if not token:
            raise SystemExit(f"--auth-token-file {a.auth_token_file}: file is empty")
        return token
    # stripped like the file: a Secret made from a file usually ends in a newline, which
    # no client sends (gRPC metadata cannot even carry one)
    raw = os.environ.get("TAMIYO_AUTH_TOKEN")
    if raw is not None and not raw.strip():
        raise SystemExit(
            "TAMIYO_AUTH_TOKEN is set but blank, which would serve without a token: give "
            "the token, or unset the variable to run without one"
        )
    return (raw or "").strip()


def _check_environment(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A bad ``TAMIYO_*`` value names the variable, not only the flag it stands for
    (an operator who set it in a manifest looks for the variable)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for action in p._actions:
        name = env_name(action.dest)
        value = os.environ.get(name)
        if value is None or action.type is None or set(action.option_strings) & given:
            continue
        try:
            action.type(value)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise SystemExit(f"{name}={value!r} (for {action.option_strings[0]}): {e}") from None


def _operator_set(p: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The destinations the operator set: on the command line (parsed again with every
    default suppressed, so abbreviations count too) or by a ``TAMIYO_*`` variable."""
    q = build_parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(q.parse_args(argv)))
    env = {a.dest for a in p._actions if env_name(a.dest) in os.environ}
    return frozenset(given | env)


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    p = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    for warning in unknown_variables(p):
        log.warning("%s", warning)
    _check_environment(p, args)
    a = p.parse_args(args)
    if bool(a.tls_cert) != bool(a.tls_key):
        given, missing = ("cert", "key") if a.tls_cert else ("key", "cert")
        raise SystemExit(
            f"--tls-{given} needs --tls-{missing} ({env_name('tls_' + missing)}): the "
            "certificate chain and its key go together"
        )
    if a.tls_client_ca and not a.tls_cert:
        raise SystemExit(
            "--tls-client-ca (mTLS) needs --tls-cert and --tls-key (TAMIYO_TLS_CERT, "
            "TAMIYO_TLS_KEY)"
        )
    d = ServerConfig()
    rules = {f.name for f in fields(RuleConfig)}
    try:
        return replace(_config(a, d), operator_rules=_operator_set(p, args) & rules)
    except ValueError as exc:  # a combination the config refuses (it names the field)
        raise SystemExit(str(exc)) from None


def _config(a: argparse.Namespace, d: ServerConfig) -> ServerConfig:
    experience = replace(
        d.experience,
        dir=a.experience_dir,
        flush_interval_s=a.flush_interval_s,
        max_file_mb=a.experience_max_file_mb,
        max_file_age_s=a.experience_max_file_age_s,
        max_total_mb=a.experience_max_total_mb,
        max_age_s=a.experience_max_age_s,
    )
    return replace(
        d,
        experience=experience,
        rules=replace(
            d.rules,
            exploration_epsilon=a.exploration_epsilon,
            **{rule: getattr(a, rule) for rule in POLICY_RULES},
        ),
        auth_token=_token(a),
        tls_cert_file=a.tls_cert,
        tls_key_file=a.tls_key,
        tls_client_ca_file=a.tls_client_ca,
        torch_threads=a.torch_threads,
        batch=replace(
            d.batch,
            decision_deadline_ms=a.deadline_ms,
            max_deadline_ms=max(d.batch.max_deadline_ms, a.deadline_ms),
            min_deadline_ms=min(d.batch.min_deadline_ms, a.deadline_ms),
            max_queue_delay_ms=a.max_queue_delay_ms,
            run_on=a.run_batches_on,
        ),
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        metrics_host=a.metrics_host,
        device=a.device,
        checkpoint_dir=a.checkpoint_dir,
        poll_interval_s=a.poll_interval_s,
        pin_checkpoint=a.pin_checkpoint,
        grace_s=a.grace_s,
    )
