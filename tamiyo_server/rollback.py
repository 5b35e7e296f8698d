"""Operator side of hot reload: list a checkpoint directory's versions and roll its
``latest`` pointer back to a verified one.

Why a pointer move: every server watching the directory (``tamiyo_server.reload``)
follows ``latest``, so one atomic replace rolls back every replica; a rollback target is
verified with ``load_checkpoint`` first, so it can never point at a broken version.
See docs/runbook.md::

    python -m tamiyo_server.reload list --checkpoint-dir D
    python -m tamiyo_server.reload rollback --checkpoint-dir D [--to VERSION] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tamiyo.policy.checkpoint import (
    LATEST,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    resolve_latest,
    set_latest,
)


def versions(root: Path) -> list[tuple[float, str]]:
    """(created_unix_s, name) of every version directory with a readable manifest,
    oldest first (the manifest's creation time; the directory mtime if unreadable)."""
    out: list[tuple[float, str]] = []
    for d in root.iterdir() if root.is_dir() else ():
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            created = float(read_manifest(d).get("created_unix_s", d.stat().st_mtime))
        except (CheckpointError, TypeError, ValueError):
            created = d.stat().st_mtime
        out.append((created, d.name))
    return sorted(out)


def pointer_problem(root: Path) -> str:
    """Why ``root/latest`` names no checkpoint, in words for the startup warning: a
    pointer naming a version that is not there must not read as an empty directory."""
    pointer = root / LATEST
    try:
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return "no 'latest' pointer"
    except OSError as e:
        return f"'latest' is unreadable: {e.strerror or e}"
    if not name:
        return "'latest' is empty"
    return f"'latest' names {name[:80]!r}, which is not a version directory there"


class Moved(NamedTuple):
    """What a rollback did: ``latest`` from ``old`` to ``new``, passing over the broken
    versions in between (``skipped``: (name, why), newest first), which the operator
    must hear of: they were meant to be served."""

    old: str
    new: str
    skipped: list[tuple[str, str]]


def rollback(root: Path, to: str = "", dry_run: bool = False) -> Moved:
    """Point ``root/latest`` at ``to`` (or the newest verified version older than the
    current one) after verifying it with ``load_checkpoint``. Raises ``CheckpointError``
    when there is nothing valid to roll back to."""
    cur = resolve_latest(root)
    cur_name = cur.name if cur is not None else ""
    names = [n for _, n in versions(root)]
    if to:
        if to not in names:  # a typo, not a broken version: say so, not "manifest missing"
            newest = ", ".join(reversed(names[-3:])) or "none"
            raise CheckpointError(
                f"no version {to!r} in {root} (newest: {newest}; 'list' shows them all)"
            )
        candidates = [to]
    else:
        if cur_name not in names:
            raise CheckpointError(f"{root}/latest names no known version; use --to VERSION")
        candidates = list(reversed(names[: names.index(cur_name)]))
    skipped: list[tuple[str, str]] = []
    for name in candidates:
        try:
            load_checkpoint(root / name)
        except CheckpointError as e:
            skipped.append((name, str(e)))
            continue
        if not dry_run:
            set_latest(root, name)
        return Moved(cur_name, name, skipped)
    detail = "; ".join(why for _, why in skipped) or "no older version"
    raise CheckpointError(f"nothing to roll back to in {root}: {detail}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tamiyo_server.reload",
        description="Inspect a checkpoint directory and roll its 'latest' pointer back.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="versions, oldest first; '*' marks latest")
    rb = sub.add_parser("rollback", help="point latest at the previous verified version")
    for sp in (ls, rb):
        sp.add_argument(
            "--checkpoint-dir",
            required=True,
            type=Path,
            help="the directory the servers watch (their --checkpoint-dir, "
            "TAMIYO_CHECKPOINT_DIR): version directories and the 'latest' pointer",
        )
    rb.add_argument("--to", default="", help="version to roll back to (default: previous)")
    rb.add_argument("--dry-run", action="store_true", help="verify and print, change nothing")
    a = p.parse_args(argv)
    root: Path = a.checkpoint_dir
    if not root.is_dir():  # a typo must not read as "no versions"
        print(f"{a.cmd} failed: --checkpoint-dir {root}: no such directory", file=sys.stderr)
        return 1
    if a.cmd == "list":
        cur = resolve_latest(root)
        found = versions(root)
        if not found:
            print(f"no checkpoint versions in {root}", file=sys.stderr)
        for created, name in found:
            mark = "*" if cur is not None and cur.name == name else " "
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
            try:  # verified as the server and rollback would (a refused one is no target)
                load_checkpoint(root / name)
                state = "ok"
            except CheckpointError as e:
                state = f"BROKEN: {str(e)[:160]}"
            print(f"{mark} {name}  {stamp}  {state}")
        return 0
    try:
        moved = rollback(root, a.to, a.dry_run)
    except (CheckpointError, ValueError) as e:
        print(f"rollback failed: {e}", file=sys.stderr)
        return 1
    for name, why in moved.skipped:
        print(f"skipped {name}: BROKEN: {why[:160]}")
    verb = "would move" if a.dry_run else "moved"
    print(f"{verb} {root / LATEST}: {moved.old or '<none>'} -> {moved.new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
