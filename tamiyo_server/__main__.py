"""``python -m tamiyo_server`` / ``tamiyo-server``: run the server until interrupted."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from tamiyo_server.cli import parse_config
from tamiyo_server.preflight import StartupError

log = logging.getLogger("tamiyo_server")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_before_the_loop(signum: int, frame: FrameType | None) -> None:
    """SIGINT / SIGTERM before the event loop runs (importing torch and the server takes
    seconds): nothing is bound, loaded or started yet, so the stop is to exit at once,
    with a line and status 0, instead of a KeyboardInterrupt traceback (SIGINT) or a
    silent death with status 143 (SIGTERM). ``os._exit``, not an exception: one raised
    into an import could be swallowed by the module being imported."""
    try:
        log.info("%s during start-up: exiting before serving", signal.Signals(signum).name)
        logging.shutdown()
    finally:
        os._exit(0)


@contextmanager
def _signals_stop_the_start() -> Iterator[None]:
    """Handlers for the time until ``serve`` installs its own on the event loop (which
    replace these); the previous ones are restored after (an in-process caller's)."""
    previous = {sig: signal.signal(sig, _stop_before_the_loop) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> None:
    """Exit status 2 for every refusal to start, whether a value (argparse's own errors
    are 2) or what the start found; the runbook documents one code, not two. Status 0
    after a stop by SIGTERM / SIGINT, whenever it came (``tamiyo_server.app.serve``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = parse_config(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # --help (0), argparse's errors (2, printed)
            raise
        print(f"tamiyo-server: error: {exc.code}", file=sys.stderr)
        raise SystemExit(2) from None
    with _signals_stop_the_start():
        # Imported here, under the handlers: importing torch is most of the start-up.
        import asyncio

        from tamiyo_server.app import serve

        try:
            asyncio.run(serve(config))
        except StartupError as exc:  # a port taken, a file missing: one line, no traceback
            log.error("cannot serve: %s", exc)
            raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
