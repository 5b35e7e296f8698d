"""Command line of the trainer: ``python -m trainer {pipeline,train,generate,fqe}``.

Hyperparameters live in ``tamiyo.config.TrainConfig`` / ``SimicConfig``; a JSON or TOML
file (``--config``, with optional ``[train]`` / ``[simic]`` tables, or flat TrainConfig
keys) and ``--set key=value`` flags override them, in that order. Unknown keys are
refused with the key named.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from tamiyo.config import SimicConfig, TrainConfig

T = TypeVar("T", TrainConfig, SimicConfig)
DEFAULT_OUT = Path("runs/default")
DEFAULT_CHECKPOINTS = Path("checkpoints/default")


def _coerce(cls: type[Any], key: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ValueError(f"{cls.__name__}: unknown key {key!r}")
    hint = hints[key]
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = typing.get_args(hint)[0]
            return tuple(inner(v) for v in items)
        if hint is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true")
        return hint(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cls.__name__}.{key}: cannot use {value!r} ({exc})") from exc


def apply(cfg: T, values: dict[str, Any]) -> T:
    """``cfg`` with ``values`` (strings or JSON/TOML values) applied, types checked."""
    return replace(cfg, **{k: _coerce(type(cfg), k, v) for k, v in values.items()})


def load_config(path: Path | None, sets: Sequence[str]) -> tuple[TrainConfig, SimicConfig]:
    """Defaults ← config file ← ``--set`` flags (``key=value`` or ``simic.key=value``)."""
    train, simic = TrainConfig(), SimicConfig()
    if path is not None:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a table / object at the top level")
        simic = apply(simic, data.pop("simic", {}))
        train = apply(train, {**data.pop("train", {}), **data})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key.startswith("simic."):
            simic = apply(simic, {key.removeprefix("simic."): value})
        else:
            train = apply(train, {key: value})
    return train, simic


def publish_target(arg: str) -> Path | None:
    """``--checkpoint-dir`` value → directory, or None for "do not publish" when empty.

    Never ``Path("")``: that is ".", and publishing would write into the current directory.
    """
    return Path(arg) if arg.strip() else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tamiyo-train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="JSON or TOML file of TrainConfig keys")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting: steps=500, simic.horizon=30")  # fmt: skip
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    pp = sub.add_parser("pipeline", help="data → BC/IQL × seeds → evaluation → report")
    common(pp)
    pp.add_argument("--out", type=Path, default=DEFAULT_OUT)
    pp.add_argument("--checkpoint-dir", type=str, default=str(DEFAULT_CHECKPOINTS),
                    help="where the default policy is published ('' to skip)")  # fmt: skip
    pp.add_argument("--resume", action="store_true",
                    help="continue the saved training state under --out (refused, naming "
                    "the differences, unless it is the same run); without it every run "
                    "starts fresh and a previous run's state is discarded")  # fmt: skip
    pt = sub.add_parser("train", help="train one algorithm on experience stores")
    common(pt)
    pt.add_argument("--data", type=Path, nargs="+", required=True,
                    help="experience stores: files or directories")  # fmt: skip
    pt.add_argument("--out", type=Path, required=True, help="run directory")
    pt.add_argument(
        "--mixed-rewards",
        action="store_true",
        help="train on simulator and served rewards together (refused otherwise: "
        "their scales differ, see trainer/README.md)",
    )
    pt.add_argument("--resume", action="store_true",
                    help="continue from the saved state (refused unless the same run)")  # fmt: skip
    pt.add_argument("--validation-episodes", type=int, default=0,
                    help="Simic episodes for periodic evaluation (0 = none)")  # fmt: skip
    pf = sub.add_parser("fqe", help="FQE check of one checkpoint (step 4 of pipeline)")
    common(pf)
    pf.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINTS,
                    help="checkpoint version directory, or a root with 'latest'")  # fmt: skip
    pf.add_argument("--data-dir", type=Path, default=DEFAULT_OUT / "data",
                    help="where the held-out store is (re)generated")  # fmt: skip
    pf.add_argument("--out", type=Path, help="write the report's fqe section here (JSON)")
    pg = sub.add_parser("generate", help="log Simic behaviour episodes to an experience store")
    common(pg)
    pg.add_argument("--out", type=Path, required=True, help="store file to write")
    pg.add_argument("--episodes", type=int, default=100)
    pg.add_argument("--seed-base", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg, simic = load_config(args.config, args.set)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"tamiyo-train: bad configuration: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    if args.cmd == "pipeline":
        from trainer.pipeline import run_pipeline

        ckpt = publish_target(args.checkpoint_dir)
        report = run_pipeline(cfg, simic, args.out, ckpt, progress=progress,
                              resume=args.resume)  # fmt: skip
        for name, t in report["targets"].items():
            print(f"  {name}: {t}")
        return 0
    if args.cmd == "fqe":
        return _fqe(args, cfg, simic, progress)
    if args.cmd == "generate":
        from trainer.pipeline import generate

        path = generate(args.out, range(args.seed_base, args.seed_base + args.episodes),
                        simic.train_sizes, simic)  # fmt: skip
        print(f"wrote {args.episodes} episodes to {path}")
        return 0
    from tamiyo.experience.schema import ExperienceStoreError
    from trainer.dataset import MixedRewardsError, load_dataset
    from trainer.evaluate import Reference
    from trainer.loop import train
    from trainer.simic.rollout import episodes_for

    try:
        data = load_dataset(args.data, cfg.gamma, progress=progress,
                            mixed_rewards=args.mixed_rewards)  # fmt: skip
    except MixedRewardsError as exc:
        print(f"tamiyo-train: {exc} (--mixed-rewards)", file=sys.stderr)
        return 2
    except ExperienceStoreError as exc:  # a missing or empty --data: one line, no traceback
        print(f"tamiyo-train: --data: {exc} (python -m trainer generate makes Simic "
              "data; server logs come from --experience-dir)", file=sys.stderr)  # fmt: skip
        return 2
    val = None
    if args.validation_episodes:
        seeds = range(2_000_000, 2_000_000 + args.validation_episodes)
        val = Reference.build(episodes_for(seeds, simic.train_sizes, simic), simic)
    res = train(cfg, data, args.out, simic=simic, validation=val, resume=args.resume,
                progress=progress, provenance={"data": [str(p) for p in args.data]})  # fmt: skip
    if res.checkpoint is not None:
        print(f"checkpoint: {res.checkpoint}")
        print(f"metrics: {args.out / 'metrics.jsonl'}")
    return 0


def _fqe(args: argparse.Namespace, cfg: TrainConfig, simic: SimicConfig, progress: bool) -> int:
    """``fqe``: the pipeline's FQE check alone, on a published or any checkpoint (to
    measure the estimate's seed noise without retraining: ``--set seed=…``,
    ``--set fqe_members=…``, ``--set heldout_data_episodes=…``)."""
    import torch

    from tamiyo.policy.checkpoint import resolve_latest
    from trainer.fqe_check import check_fqe, fqe_targets, heldout_store
    from trainer.report import write_json
    from trainer.summary import clean

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    root: Path = args.checkpoint
    ckpt = resolve_latest(root) if (root / "latest").exists() else root
    if ckpt is None:
        print(f"tamiyo-train: {root}: no valid 'latest' pointer", file=sys.stderr)
        return 2
    fqe = clean(check_fqe(cfg, simic, ckpt, heldout_store(cfg, simic, args.data_dir),
                          progress))  # fmt: skip
    result = {"checkpoint": str(ckpt), "fqe": fqe, "targets": fqe_targets(fqe),
              "config": {k: getattr(cfg, k) for k in ("seed", "fqe_members", "fqe_steps",
                                                      "heldout_data_episodes")}}  # fmt: skip
    if args.out is not None:
        write_json(result, args.out)
    print(json.dumps(result["targets"]))
    return 0
