"""``python -m tamiyo_server`` / ``tamiyo-server``: run the server until interrupted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from tamiyo_server.app import StartupError, serve
from tamiyo_server.cli import parse_config


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(parse_config(argv)))
    except StartupError as exc:  # a port taken, a file missing: one line, not a traceback
        logging.getLogger("tamiyo_server").error("cannot serve: %s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
