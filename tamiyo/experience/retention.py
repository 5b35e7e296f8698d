"""Retention of a directory of experience store files: size and age limits.

Why "idle" files only: several replicas may write into one shared directory, and a file
still being appended to must never disappear under its writer. A file (with its ``-wal``)
unmodified for ``idle_s`` is treated as closed: writers commit once per flush interval
(1 s by default) while they have traffic, and rotate to a new file long before that.
Deleting a file a reader has open is safe on POSIX (the reader keeps its snapshot).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tamiyo.experience.reader import STORE_SUFFIXES

_LOG = logging.getLogger(__name__)
_SIDECARS = ("-wal", "-shm")


def _parts(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + s) for s in _SIDECARS)]


def _size_and_mtime(path: Path) -> tuple[int, float]:
    size, mtime = 0, 0.0
    for p in _parts(path):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        size += st.st_size
        mtime = max(mtime, st.st_mtime)
    return size, mtime


def enforce_retention(
    directory: Path,
    *,
    keep: Path | None,
    max_total_bytes: int,
    max_age_s: float,
    idle_s: float,
    now: float | None = None,
) -> int:
    """Delete idle store files, oldest first, while the directory holds more than
    ``max_total_bytes`` (0 = no limit) or a file is older than ``max_age_s`` (s since its
    last write; 0 = no limit). ``keep`` (the caller's current file) is never deleted.
    Returns the number of files deleted."""
    if max_total_bytes <= 0 and max_age_s <= 0:
        return 0
    t = time.time() if now is None else now
    files = []
    for f in directory.iterdir():
        if f.suffix in STORE_SUFFIXES and f.is_file():
            size, mtime = _size_and_mtime(f)
            files.append((mtime, f, size))
    files.sort()
    total = sum(size for _, _, size in files)
    deleted = 0
    for mtime, f, size in files:
        if keep is not None and f.resolve() == keep.resolve():
            continue
        age = t - mtime
        if age < idle_s:
            continue
        too_big = max_total_bytes > 0 and total > max_total_bytes
        too_old = max_age_s > 0 and age > max_age_s
        if not (too_big or too_old):
            continue
        for p in _parts(f):
            p.unlink(missing_ok=True)
        total -= size
        deleted += 1
        _LOG.info("experience retention: deleted %s (%d bytes, idle %.0f s)", f, size, age)
    return deleted
