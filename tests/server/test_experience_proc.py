"""Why a store commit failed (``loss_reason``) and the counting of lost rows.

The end-to-end case (a server whose store fills up while it serves) is in
``test_experience_log.py``; here each classification is checked on its own, with real
SQLite errors where SQLite can be made to produce them.
"""

from __future__ import annotations

import errno
import logging
import resource
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from tamiyo.experience import writer as writer_module
from tamiyo_server.experience_proc import ROOM_BYTES, LossCounter, loss_reason, no_room

SQLITE_IOERR_WRITE = 778  # extended result code (SQLITE_IOERR | 3 << 8)


def _sqlite_full(tmp: Path) -> sqlite3.Error:
    """A real SQLITE_FULL: the database may not grow past a few pages."""
    with closing(sqlite3.connect(tmp / "full.sqlite")) as conn:
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute("PRAGMA max_page_count = 8")
        try:
            for _ in range(100):
                conn.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
                conn.commit()
        except sqlite3.OperationalError as e:
            return e
    raise AssertionError("max_page_count did not stop the database growing")


def _io_error() -> sqlite3.Error:
    e = sqlite3.OperationalError("disk I/O error")
    e.sqlite_errorcode = SQLITE_IOERR_WRITE
    return e


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_FSIZE set to ``limit`` bytes, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_sqlite_full_is_disk_full(tmp_path: Path) -> None:
    e = _sqlite_full(tmp_path)
    assert "full" in str(e)
    assert loss_reason(e) == "disk_full"


def test_io_error_is_disk_full_only_when_the_store_has_no_room(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    store.write_bytes(b"\0" * 4096)
    assert not no_room(store)  # a test machine has more than 1 MiB free
    assert loss_reason(_io_error(), store) == "io_error"
    assert loss_reason(_io_error()) == "io_error"
    with _file_size_limit(4096 + ROOM_BYTES // 2):  # EFBIG is what the next page would get
        assert no_room(store)
        assert loss_reason(_io_error(), store) == "disk_full"


def test_os_errors_and_others(tmp_path: Path) -> None:
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert loss_reason(OSError(code, "no")) == "disk_full"
    assert loss_reason(OSError(errno.EIO, "dead disk")) == "io_error"
    assert loss_reason(sqlite3.OperationalError("database is locked")) == "write_error"
    assert loss_reason(ValueError("bug")) == "write_error"
    assert loss_reason(None) == "write_error"


def test_loss_counter_counts_the_writers_failed_commits(tmp_path: Path) -> None:
    """Logged the way ``ExperienceWriter`` logs a failed commit, through its logger."""
    counter = LossCounter(lambda: tmp_path / "s.sqlite")
    log = logging.getLogger(writer_module.__name__)
    log.addHandler(counter)
    try:
        for e, n in ((_sqlite_full(tmp_path), 40), (_io_error(), 7)):
            try:
                raise e
            except sqlite3.Error:
                log.exception("experience store write failed; %d records lost", n)
        log.warning("not a loss")
    finally:
        log.removeHandler(counter)
    snap = counter.snapshot()
    assert snap["lost"] == {"disk_full": 40, "io_error": 7, "write_error": 0}
    assert snap["failed_commits"] == {"disk_full": 1, "io_error": 1, "write_error": 0}
