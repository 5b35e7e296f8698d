"""The experience process's CPU priority: ``SCHED_IDLE`` while it keeps up, nice 10
while it falls behind.

Why not one setting:

* at nice 10 the process preempts the serving event loop when it wakes between its
  20 ms shipments (a sleeper wakes with a small virtual runtime): logging on cost p99
  1.17-1.21x logging off at 64 streams x 300 frames/s on 2 cores. A ``SCHED_IDLE`` task
  never preempts a normal one (p99 within ~3 % of logging off);
* but a ``SCHED_IDLE`` task gets almost no CPU while anything else wants it (weight 3
  against 1024). With the box saturated by other work (two busy loops next to a test
  server), its commits fell behind by seconds and a kill -9 lost 861 decisions older
  than the flush interval, which the log promises never to lose (``test_crash``).

So the server watches the process's heartbeat (the ``STATS`` line it writes once per
flush interval): one more than ``stall_s`` late means it is starved, and it runs at nice
10 until it has kept its heartbeat for ``hold_s``. Linux only; leaving ``SCHED_IDLE``
needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` allowing nice 10 (``can_undo_idle``: checked,
not tried, since entering ``SCHED_IDLE`` always succeeds and a failed undo would leave
the process there for good). The switch is made once, at the first heartbeat (not
before: as ``SCHED_IDLE`` on a busy box its imports alone took seconds, and nothing was
logged meanwhile); where it cannot be undone the process stays at nice 10 (the loss
bound is the promise; the tail latency is the price).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

NICE = 10
"""Niceness of the experience process when not ``SCHED_IDLE``: at nice 10 the CFS weight
is ~1/10 of a nice-0 process."""
HOLD_S = 10.0  # a starved process stays at nice 10 this long after its last late heartbeat


def _threads(pid: int) -> list[int]:
    """Every thread of ``pid``: Linux scheduling policy and nice are per thread."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def set_idle(pid: int, idle: bool) -> bool:
    """``SCHED_IDLE`` (``idle``) or ``SCHED_OTHER`` at nice ``NICE`` for every thread of
    ``pid``; False if refused or not supported (nothing is half-changed on purpose, but
    a thread that exits meanwhile is skipped)."""
    try:
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError):
                if idle:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                else:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                    os.setpriority(os.PRIO_PROCESS, tid, NICE)
    except (AttributeError, OSError):
        return False
    return True


_CAP_SYS_NICE = 23  # capability bit (linux/capability.h)


def can_undo_idle() -> bool:
    """Whether this process may move a child it started out of ``SCHED_IDLE`` to nice
    ``NICE``: ``CAP_SYS_NICE`` in its effective set, or an ``RLIMIT_NICE`` (inherited by
    the child) allowing nice ``NICE`` (the kernel's ``can_nice``: 20 - nice <= limit).
    Root in a default container has no ``CAP_SYS_NICE``."""
    try:
        status = Path("/proc/self/status").read_text()
        eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        if int(eff.split()[1], 16) >> _CAP_SYS_NICE & 1:
            return True
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return False
    return bool(soft == resource.RLIM_INFINITY or soft >= 20 - NICE)


class BackgroundPriority:
    """Owned by the server's ``ExperienceLog``; ``check`` runs on its shipping thread."""

    def __init__(self, pid: int, stall_s: float, hold_s: float = HOLD_S) -> None:
        self.pid = pid
        self.stall_s = stall_s
        self.hold_s = hold_s
        self._hold_until = 0.0
        self.linux = Path("/proc").is_dir()
        self.started = False  # ``start`` ran (the process's first heartbeat)
        self.managed = False  # SCHED_IDLE can be set and undone here
        self.idle = False
        self.promotions = 0  # times the process was found starved

    def start(self) -> None:
        """The process is up (its first heartbeat, its imports done): ``SCHED_IDLE`` if it
        can be undone (see the module doc)."""
        if self.started:
            return
        self.started = True
        pid = self.pid
        self.managed = self.linux and can_undo_idle()
        self.idle = self.managed and set_idle(pid, True)
        if self.linux and not self.managed:
            log.info(
                "experience process stays at nice %d: no CAP_SYS_NICE or RLIMIT_NICE >= %d "
                "to bring it back from SCHED_IDLE when starved",
                NICE,
                20 - NICE,
            )

    def release(self) -> None:
        """Shutdown: nice 10 for the final commit (as ``SCHED_IDLE`` on a busy box it could
        starve past the close timeout and be killed with events uncommitted)."""
        if self.idle and set_idle(self.pid, False):
            self.idle = False

    def check(self, last_heartbeat: float, now: float | None = None) -> None:
        """Promote a starved process to nice 10; return it to ``SCHED_IDLE`` once it has
        kept its heartbeat for ``hold_s``."""
        if not self.managed:
            return
        now = time.monotonic() if now is None else now
        if now - last_heartbeat > self.stall_s:
            self._hold_until = now + self.hold_s
            if self.idle and set_idle(self.pid, False):
                self.idle = False
                self.promotions += 1
                log.info(
                    "experience process starved (no heartbeat for %.1f s): nice %d until "
                    "it keeps up",
                    now - last_heartbeat,
                    NICE,
                )
        elif not self.idle and now >= self._hold_until and set_idle(self.pid, True):
            self.idle = True
