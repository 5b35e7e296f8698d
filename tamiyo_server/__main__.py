"""``python -m tamiyo_server`` / ``tamiyo-server``: run the server until interrupted."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from tamiyo_server.app import serve
from tamiyo_server.cli import parse_config
from tamiyo_server.preflight import StartupError


def main(argv: Sequence[str] | None = None) -> None:
    """Exit status 2 for every refusal to start, whether a value (argparse's own errors
    are 2) or what the start found; the runbook documents one code, not two."""
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
    try:
        asyncio.run(serve(config))
    except StartupError as exc:  # a port taken, a file missing: one line, not a traceback
        logging.getLogger("tamiyo_server").error("cannot serve: %s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
