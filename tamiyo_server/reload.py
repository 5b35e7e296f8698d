"""Hot reload: follow a checkpoint directory's ``latest`` pointer and swap policies live.

Why a poller and not inotify: checkpoints reach replicas over shared volumes (NFS, CSI
object-store mounts) where change notification is unreliable; a stat every
``poll_interval_s`` (default 1 s) costs microseconds and works everywhere.

One background thread (never the event loop, never the inference thread) does the whole
reload: stat → ``load_checkpoint`` (manifest, sha256, feature schema, shapes, finite
weights) → a warm-up forward on sample graphs whose outputs must be finite and whose
CPU time must fit the decision budget (ms) unless it is no slower than the serving policy
(see ``check_serving``) → ``PolicyHolder.swap``. Serving reads ``holder.current`` once
per batch, so the swap lands between batches, never inside one. The watcher drops the
replaced policy at its next poll (usually the last reference, so it is freed on this
thread rather than inside a decision; no growth across reloads).

What a reload costs serving is GIL time: ``tamiyo_server.polite_load`` (``load_served``)
keeps it small and hands it out politely.

A refused checkpoint is logged, counted and reported (``PolicyHolder.refuse``) and
remembered by its fingerprint — path plus size and mtime (ns) of the manifest and the
weights — so it is tried again only if those files change: never in a tight loop.

Rollback: ``python -m tamiyo_server.reload rollback`` (``tamiyo_server.rollback``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tamiyo.config import ServerConfig
from tamiyo.policy.checkpoint import (
    LATEST,
    MANIFEST,
    WEIGHTS,
    CheckpointError,
    history,
    resolve_latest,
)
from tamiyo.policy.engine import resolve_device
from tamiyo_server.policy_holder import (
    PolicyHolder,
    ServedPolicy,
    check_serving,
    load_initial,
)
from tamiyo_server.polite_load import load_served, yield_gil
from tamiyo_server.rollback import main, pointer_problem, rollback, versions

__all__ = ["CheckpointWatcher", "check_serving", "load_served", "main", "rollback", "versions"]

log = logging.getLogger(__name__)

MAX_REMEMBERED = 256  # refused fingerprints kept (oldest forgotten first)


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
    is refused (reported like a reload refusal) and the server falls back, as when
    ``latest`` is missing or names no version: to what ``latest`` named before, newest
    first (``checkpoint.history``: the version the running replicas kept when they
    refused the same ``latest``; the newest by creation time could be one an operator
    had rolled back from), then to the newest other version that verifies; failing that,
    the bundled default or the built-in policy, which is also what a directory without
    any version serves (the trainer has not run yet, or a typo: the warning names the
    directory). The watcher picks up the first checkpoint ``latest`` names later.
    """
    dev = str(resolve_device(config.device))
    if not config.checkpoint_dir:
        return load_initial(dev), None
    root = Path(config.checkpoint_dir)
    latest = resolve_latest(root)
    refusal: tuple[str, str] | None = None
    if latest is not None:
        try:
            return load_served(latest, dev, math.inf), None
        except CheckpointError as e:
            refusal = (str(latest), str(e))
            log.error("startup: %s", e)
    found = [name for _, name in versions(root) if latest is None or name != latest.name]
    before = [name for name in history(root) if name in found]
    for name in [*before, *(n for n in reversed(found) if n not in before)]:
        try:
            served = load_served(root / name, dev, math.inf)
        except CheckpointError:
            continue
        log.warning(
            "startup: %s in %s; serving %s, %s",
            "latest refused" if latest is not None else pointer_problem(root),
            root,
            "the last version latest named that verifies"
            if name in before
            else "the newest version that verifies",
            name,
        )
        return served, refusal
    served = load_initial(dev)
    if latest is None:
        if not root.exists():
            state = "does not exist (yet; it is watched)"
        elif found:
            state = f"holds no version that verifies ({pointer_problem(root)})"
        elif (root / LATEST).exists():
            state = f"holds no version: {pointer_problem(root)}"
        else:
            state = "holds no checkpoint yet (no 'latest', no version directory)"
        log.warning(
            "--checkpoint-dir %s %s: serving %s %s until 'latest' there names a checkpoint",
            root,
            state,
            "the UNTRAINED built-in policy" if served.builtin else "the bundled default",
            served.version,
        )
    return served, refusal


def declared_rules_change(
    old: ServedPolicy | None, new: ServedPolicy, fixed: frozenset[str] = frozenset()
) -> str:
    """A warning when ``new`` declares other ``serving_rules`` than ``old``, else "".
    Why: the rules in force follow the checkpoint (unless the operator set them), so a
    hot reload can turn the health veto on or off for every stream, which changes what
    the server decides as much as new weights do; it must be in the log."""
    before = {k: v for k, v in (old.serving_rules if old else ()) if k not in fixed}
    after = {k: v for k, v in new.serving_rules if k not in fixed}
    if before == after:  # (rules the operator set, ``fixed``, do not change)
        return ""

    def show(rules: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(rules.items())) or "none"

    was = old.version if old is not None else "the previous policy"
    return (
        f"{new.version} declares serving_rules {show(after)} ({was} declared "
        f"{show(before)}): the decision rules in force change with it (GetPolicyInfo "
        "rules_json shows them; a rule the operator set is not counted here)"
    )


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
        operator_rules: frozenset[str] = frozenset(),
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.root = Path(root)
        self.holder = holder
        self.device = str(resolve_device(device))
        self.poll_interval_s = poll_interval_s
        self.budget_ms = budget_ms
        self.operator_rules = operator_rules  # rules no checkpoint changes (for the log)
        self.polls = 0  # polls done so far
        self.attempts = 0  # load attempts (ok + refused), for tests and the bench
        self.swapped_at_poll = 0  # value of ``polls`` at the last swap
        self.last_load_s = 0.0  # wall time of the last attempt, s
        self.last_stages: dict[str, float] = {}  # ms per step of the last load (load_served)
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
        # The policy replaced by the last swap, dropped at the next poll (see _attempt).
        self._retired: ServedPolicy | None = None

    @classmethod
    def for_server(cls, config: ServerConfig, holder: PolicyHolder) -> CheckpointWatcher:
        return cls(
            config.checkpoint_dir,
            holder,
            config.device,
            config.poll_interval_s,
            config.batch.decision_deadline_ms,
            config.operator_rules,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tamiyo-reload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop polling; waits up to ``timeout`` s for a poll or load in progress
        (blocking: call off the loop). True once the thread has ended."""
        self.request_stop()
        return self.join(timeout)

    def request_stop(self) -> None:
        """Ask the thread to stop after the poll in progress, without waiting for it.

        Why separate from ``join``: a poll can hang in a ``stat`` or a read of a hung
        shared volume (NFS, an object-store mount). A shutdown must not wait for that
        before telling streams to close; it signals here first and joins at the end,
        within what is left of its grace (the thread is a daemon, so one still stuck
        then does not keep the process alive)."""
        self._stop.set()

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s (None: for ever) for the thread to end; True when it
        has (or never started). Blocking: call off the event loop."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

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
        if self._retired is not None:
            yield_gil()
            self._retired = None  # usually the last reference: freed here, on this thread
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
        self.last_stages = {}
        try:
            served = load_served(
                path, self.device, self.budget_ms, self.holder.current, self.last_stages
            )
        except CheckpointError as e:
            return self._refuse(fp, str(e), t0)
        except Exception as e:  # e.g. OSError mid-read, torch errors: refuse, never crash
            log.exception("loading %s failed unexpectedly", path)
            return self._refuse(fp, f"checkpoint {path} refused: {type(e).__name__}: {e}", t0)
        # Hold the replaced policy until the next poll: the serving thread drops its own
        # references within a batch or two, and freeing it (~0.3-0.5 ms of GIL-holding
        # deallocation of the engine and model) then happens on this thread, not inside
        # a decision on the event loop. Released by refcount, no GC needed.
        self._retired = self.holder.current
        self.holder.swap(served)
        self._serving = fp
        self.swapped_at_poll = self.polls
        self.last_load_s = time.monotonic() - t0
        steps = ", ".join(f"{k} {v:.0f}" for k, v in self.last_stages.items())
        log.info(
            "reloaded %s from %s in %.0f ms (%s ms)",
            served.version,
            path,
            self.last_load_s * 1e3,
            steps,
        )
        if change := declared_rules_change(self._retired, served, self.operator_rules):
            log.warning("%s", change)
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


if __name__ == "__main__":  # the operator CLI lives in tamiyo_server.rollback
    raise SystemExit(main())
