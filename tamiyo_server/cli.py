"""Command line and environment configuration of the server.

Each flag has a ``TAMIYO_<FLAG>`` environment variable (``--port`` ↔ ``TAMIYO_PORT``);
a flag given on the command line wins over the variable, which wins over the default in
``tamiyo.config``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import replace

from tamiyo.config import ServerConfig


def _env(name: str, default: object) -> str:
    return os.environ.get(f"TAMIYO_{name.upper()}", str(default))


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="tamiyo-server", description="Serve Tamiyo decisions.")
    p.add_argument("--host", default=_env("host", d.host), help="address to bind")
    p.add_argument("--port", type=int, default=int(_env("port", d.port)), help="0 = any")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("metrics_port", d.metrics_port)),
        help="Prometheus port; 0 disables",
    )
    p.add_argument("--device", default=_env("device", d.device), help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--checkpoint-dir",
        default=_env("checkpoint_dir", d.checkpoint_dir),
        help="directory watched for new checkpoints; empty = bundled default policy",
    )
    p.add_argument(
        "--grace-s", type=float, default=float(_env("grace_s", d.grace_s)), help="shutdown grace"
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    a = build_parser().parse_args(argv)
    return replace(
        ServerConfig(),
        host=a.host,
        port=a.port,
        metrics_port=a.metrics_port,
        device=a.device,
        checkpoint_dir=a.checkpoint_dir,
        grace_s=a.grace_s,
    )
