"""Hot reload: follow a checkpoint directory's ``latest`` pointer and swap policies live.

Why a poller and not inotify: checkpoints reach replicas over shared volumes (NFS, CSI
object-store mounts) where change notification is unreliable; a stat every
``poll_interval_s`` (default 1 s) costs microseconds and works everywhere.

One background thread (never the event loop, never the inference thread) does the whole
reload: stat → ``load_checkpoint`` (manifest, sha256, feature schema, shapes, finite
weights) → a warm-up forward on sample graphs whose outputs must be finite and whose
CPU time must fit the decision budget (ms) unless it is no slower than the serving policy
(see ``check_serving``) → ``PolicyHolder.swap``. The inference thread reads
``holder.current`` once per batch, so the swap lands between batches, never inside one.
The thread is deliberately *not* reniced: it holds the GIL while it runs Python (model
construction, state-dict copy), and a low-priority GIL holder preempted on a busy box
would stall the event loop and the inference thread (priority inversion); its CPU
(~30 ms per reload) is small and it yields the GIL between warm-up forwards. After the
swap nothing here keeps the old policy: the last in-flight batch drops the last
reference and its memory is freed (no growth across reloads).

A refused checkpoint is logged, counted and reported (``PolicyHolder.refuse``) and
remembered by its fingerprint — path plus size and mtime (ns) of the manifest and the
weights — so it is tried again only if those files change: never in a tight loop.

Rollback (operator side, see docs/runbook.md)::

    python -m tamiyo_server.reload list --checkpoint-dir D
    python -m tamiyo_server.reload rollback --checkpoint-dir D [--to VERSION]
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tamiyo.config import ServerConfig
from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.checkpoint import (
    LATEST,
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    resolve_latest,
    set_latest,
)
from tamiyo.policy.engine import resolve_device
from tamiyo.policy.features import GraphTensors
from tamiyo.policy.synthetic import random_graphs
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy, load_initial, serve_loaded

log = logging.getLogger(__name__)

SAMPLE_SIZES = (8, 16, 32)  # nodes per sample graph of the warm-up batch (56 nodes)
MAX_REMEMBERED = 256  # refused fingerprints kept (oldest forgotten first)
SLOWER_LIMIT = 1.5  # x the serving policy's warm-up time, see check_serving


@dataclass(frozen=True)
class Fingerprint:
    """What one load attempt saw: the version directory and (size, mtime_ns) of its
    manifest and weights (None when missing). A change in any of them means new bytes."""

    path: str
    manifest: tuple[int, int] | None
    weights: tuple[int, int] | None


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def fingerprint(path: Path) -> Fingerprint:
    return Fingerprint(str(path), _stat(path / MANIFEST), _stat(path / WEIGHTS))


@functools.cache
def _sample_graphs() -> list[GraphTensors]:
    """Featurized once per process (read-only arrays, safe to share across reloads)."""
    return random_graphs(0, list(SAMPLE_SIZES))


def _forward_cpu_ms(served: ServedPolicy, graphs: list[GraphTensors]) -> float:
    time.sleep(0)  # let the event loop / inference thread take the GIL between forwards
    t0 = time.thread_time()
    served.engine.infer(graphs)
    return (time.thread_time() - t0) * 1000.0


def check_serving(
    served: ServedPolicy, budget_ms: float, current: ServedPolicy | None = None, repeats: int = 3
) -> float:
    """Warm up ``served`` on sample graphs and refuse it unless it can serve.

    Runs one untimed forward (pays one-off costs), then ``repeats`` timed ones on the
    same batch of ``SAMPLE_SIZES`` graphs. Every output must be finite (finite weights
    can still overflow). Speed: the fastest forward's CPU time of this thread (ms) is
    compared with ``budget_ms``; CPU time, not wall time, so waiting for a core does not
    count. On 2 busy vCPUs CPU time still inflates (shared core, caches), so when it is
    over the budget and the ``current`` policy is given, both are timed again on the same
    batch, interleaved, and the new one is refused only if it is also over
    ``SLOWER_LIMIT`` × the current one: a machine that is slow for every policy does not
    refuse a good checkpoint. The usual reload pays 1 + ``repeats`` small forwards.
    Returns the new policy's time in ms; raises ``CheckpointError`` naming the problem.
    """
    graphs = _sample_graphs()
    outs = served.engine.infer(graphs)
    where = served.checkpoint_path
    for i, o in enumerate(outs):
        scalars = (o.adapt_prob, o.urgency, o.value, o.noop_logp)
        if not (all(math.isfinite(v) for v in scalars) and np.isfinite(o.target_probs).all()):
            raise CheckpointError(
                f"checkpoint {where} refused: warm-up forward gave non-finite outputs "
                f"on sample graph {i} ({SAMPLE_SIZES[i]} nodes)"
            )
    best = min(_forward_cpu_ms(served, graphs) for _ in range(repeats))
    cur = math.inf
    if best > budget_ms and current is not None:
        for _ in range(repeats):
            cur = min(cur, _forward_cpu_ms(current, graphs))
            best = min(best, _forward_cpu_ms(served, graphs))
    if best > budget_ms and (current is None or best > SLOWER_LIMIT * cur):
        vs = f" ({best / cur:.1f}x the serving policy)" if current is not None else ""
        raise CheckpointError(
            f"checkpoint {where} refused: warm-up forward of {len(graphs)} sample graphs "
            f"({sum(SAMPLE_SIZES)} nodes) took {best:.2f} ms CPU{vs}, over the "
            f"{budget_ms:g} ms decision budget"
        )
    return best


def load_served(
    path: Path, device: str, budget_ms: float, current: ServedPolicy | None = None
) -> ServedPolicy:
    """Verify and warm up the checkpoint at ``path``; raises ``CheckpointError``."""
    loaded = load_checkpoint(path, device)
    served = serve_loaded(loaded, device, warmup=False)
    check_serving(served, budget_ms, current)
    return served


def resolve_pin(pin: str, checkpoint_dir: str = "") -> Path:
    """``pin`` is a checkpoint directory, or a version name inside ``checkpoint_dir``."""
    direct = Path(pin)
    if direct.is_dir():
        return direct
    if checkpoint_dir and (Path(checkpoint_dir) / pin).is_dir():
        return Path(checkpoint_dir) / pin
    raise CheckpointError(
        f"pinned checkpoint {pin!r} is neither a directory nor a version in "
        f"--checkpoint-dir {checkpoint_dir!r}"
    )


def load_pinned(config: ServerConfig) -> ServedPolicy:
    """The startup policy of a pinned server: exactly ``config.pin_checkpoint``, fully
    verified; a bad pin stops startup (serving something else would defeat the pin)."""
    dev = str(resolve_device(config.device))
    path = resolve_pin(config.pin_checkpoint, config.checkpoint_dir)
    served = load_served(path, dev, math.inf)  # outputs checked; no budget at startup
    log.info("pinned to policy %s from %s (hot reload off)", served.version, path)
    return served


def load_startup(config: ServerConfig) -> tuple[ServedPolicy, tuple[str, str] | None]:
    """The startup policy of an unpinned server, and the (path, reason) of a refusal.

    ``checkpoint_dir``'s latest, verified like a reload. A broken ``latest`` must not stop
    startup: a restart loop would take down every replica that shares the directory. It
    is refused (reported like a reload refusal) and the newest other version that
    verifies is served; failing that, the bundled default or the built-in policy.
    """
    root = Path(config.checkpoint_dir)
    latest = resolve_latest(root) if config.checkpoint_dir else None
    if latest is None:
        return load_initial(config.checkpoint_dir, config.device), None
    dev = str(resolve_device(config.device))
    try:
        return load_served(latest, dev, math.inf), None
    except CheckpointError as e:
        refusal = (str(latest), str(e))
        log.error("startup: %s", e)
    for _, name in reversed(versions(root)):
        if name == latest.name:
            continue
        try:
            served = load_served(root / name, dev, math.inf)
        except CheckpointError:
            continue
        log.warning("startup: latest refused; serving the newest good version %s", name)
        return served, refusal
    try:
        return load_initial("", config.device), refusal
    except CheckpointError:
        return serve_loaded(builtin_policy(device=dev), dev), refusal


class CheckpointWatcher:
    """Polls ``root/latest`` every ``poll_interval_s`` and hot-swaps verified policies.

    ``start()``/``stop()`` manage the thread; ``poll_once()`` is one synchronous step
    (the thread's body; tests call it directly). Outcomes: ``"none"`` (no pointer),
    ``"unchanged"``, ``"known-refused"``, ``"loaded"``, ``"refused"``.
    """

    def __init__(
        self,
        root: str | Path,
        holder: PolicyHolder,
        device: str = "cpu",
        poll_interval_s: float = 1.0,
        budget_ms: float = 10.0,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.root = Path(root)
        self.holder = holder
        self.device = str(resolve_device(device))
        self.poll_interval_s = poll_interval_s
        self.budget_ms = budget_ms
        self.polls = 0  # polls done so far
        self.attempts = 0  # load attempts (ok + refused), for tests and the bench
        self.swapped_at_poll = 0  # value of ``polls`` at the last swap
        self.last_load_s = 0.0  # wall time of the last attempt, s
        self._refused: OrderedDict[Fingerprint, str] = OrderedDict()
        self._bad_pointer: tuple[int, int] | None = None
        cur = holder.current.checkpoint_path
        self._serving: Fingerprint | None = (
            fingerprint(Path(cur)) if not holder.current.builtin else None
        )
        if holder.last_refused_path:  # refused at startup (load_startup): not again
            self._refused[fingerprint(Path(holder.last_refused_path))] = holder.last_refused_reason
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_server(cls, config: ServerConfig, holder: PolicyHolder) -> CheckpointWatcher:
        return cls(
            config.checkpoint_dir,
            holder,
            config.device,
            config.poll_interval_s,
            config.batch.decision_deadline_ms,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tamiyo-reload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop polling; waits for a load in progress (blocking: call off the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        log.info("watching %s every %.2f s", self.root / LATEST, self.poll_interval_s)
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any surprise; serving goes on
                log.exception("checkpoint watcher poll failed")
            self._stop.wait(self.poll_interval_s)

    # ------------------------------------------------------------------ one poll
    def poll_once(self) -> str:
        self.polls += 1
        path = resolve_latest(self.root)
        if path is None:
            return self._pointer_problem()
        self._bad_pointer = None
        fp = fingerprint(path)
        if fp == self._serving:
            return "unchanged"
        if fp in self._refused:
            return "known-refused"
        return self._attempt(path, fp)

    def _attempt(self, path: Path, fp: Fingerprint) -> str:
        self.attempts += 1
        t0 = time.monotonic()
        try:
            served = load_served(path, self.device, self.budget_ms, self.holder.current)
        except CheckpointError as e:
            return self._refuse(fp, str(e), t0)
        except Exception as e:  # e.g. OSError mid-read, torch errors: refuse, never crash
            log.exception("loading %s failed unexpectedly", path)
            return self._refuse(fp, f"checkpoint {path} refused: {type(e).__name__}: {e}", t0)
        self.holder.swap(served)
        self._serving = fp
        self.swapped_at_poll = self.polls
        self.last_load_s = time.monotonic() - t0
        log.info("reloaded %s from %s in %.0f ms", served.version, path, self.last_load_s * 1e3)
        return "loaded"

    def _refuse(self, fp: Fingerprint, reason: str, t0: float) -> str:
        self.last_load_s = time.monotonic() - t0
        self._refused[fp] = reason
        while len(self._refused) > MAX_REMEMBERED:
            self._refused.popitem(last=False)
        self.holder.refuse(fp.path, reason)
        return "refused"

    def _pointer_problem(self) -> str:
        """``latest`` missing is normal (nothing trained yet), and so is an empty one
        (someone is writing it in place, e.g. ``echo v7 > latest``: truncate, then write);
        ``latest`` naming no checkpoint directory is refused once per pointer content."""
        pointer = self.root / LATEST
        st = _stat(pointer)
        if st is None or st[0] == 0 or not pointer.is_file():
            return "none"
        if st == self._bad_pointer:
            return "known-refused"
        try:
            name = pointer.read_text(encoding="utf-8", errors="replace").strip()[:200]
        except OSError as e:
            name = f"<unreadable: {e}>"
        if not name:
            return "none"
        self._bad_pointer = st
        self.attempts += 1
        self.holder.refuse(
            str(pointer), f"{pointer} names {name!r}, which is not a checkpoint directory here"
        )
        return "refused"


# ---------------------------------------------------------------------- operator CLI
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


def rollback(root: Path, to: str = "", dry_run: bool = False) -> tuple[str, str]:
    """Point ``root/latest`` at ``to`` (or the newest verified version older than the
    current one) after verifying it with ``load_checkpoint``; returns (old, new).
    Raises ``CheckpointError`` when there is nothing valid to roll back to."""
    cur = resolve_latest(root)
    cur_name = cur.name if cur is not None else ""
    names = [n for _, n in versions(root)]
    if to:
        candidates = [to]
    else:
        if cur_name not in names:
            raise CheckpointError(f"{root}/latest names no known version; use --to VERSION")
        candidates = list(reversed(names[: names.index(cur_name)]))
    reasons = []
    for name in candidates:
        try:
            load_checkpoint(root / name)
        except CheckpointError as e:
            reasons.append(str(e))
            continue
        if not dry_run:
            set_latest(root, name)
        return cur_name, name
    detail = "; ".join(reasons) or "no older version"
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
        sp.add_argument("--checkpoint-dir", required=True, type=Path)
    rb.add_argument("--to", default="", help="version to roll back to (default: previous)")
    rb.add_argument("--dry-run", action="store_true", help="verify and print, change nothing")
    a = p.parse_args(argv)
    root: Path = a.checkpoint_dir
    if a.cmd == "list":
        cur = resolve_latest(root)
        for created, name in versions(root):
            mark = "*" if cur is not None and cur.name == name else " "
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
            print(f"{mark} {name}  {stamp}")
        return 0
    try:
        old, new = rollback(root, a.to, a.dry_run)
    except (CheckpointError, ValueError) as e:
        print(f"rollback failed: {e}", file=sys.stderr)
        return 1
    verb = "would move" if a.dry_run else "moved"
    print(f"{verb} {root / LATEST}: {old or '<none>'} -> {new}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
