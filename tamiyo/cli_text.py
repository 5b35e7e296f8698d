"""How the command-line tools print their ``--help``: the module docstring as written
(its paragraphs and command examples kept), without reStructuredText markup, and every
flag's default. One formatter for every entry point, so they read alike."""

from __future__ import annotations

import argparse
import re

_LITERAL = re.compile(r"``([^`]+)``")
_NO_DEFAULT = (None, False, "", argparse.SUPPRESS)


def describe(doc: str | None) -> str:
    """A module docstring as a ``--help`` description: ``literal`` markup removed."""
    return _LITERAL.sub(r"\1", (doc or "").strip())


def secret(action: argparse.Action) -> argparse.Action:
    """Mark a flag whose default must never be printed (a token read from the
    environment would otherwise show in ``--help``, in a terminal or a CI log)."""
    action.secret = True  # type: ignore[attr-defined]
    return action


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (argparse would reflow an example command into the
    prose around it), and ``(default: ...)`` after each flag that has a default worth
    saying (not None, False or empty, and not a ``secret`` one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = not isinstance(action.default, bool) and action.default not in _NO_DEFAULT
        if shown and not getattr(action, "secret", False) and "%(default)" not in text:
            text = f"{text} (default: %(default)s)"
        return text
