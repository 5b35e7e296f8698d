"""The server's ``TAMIYO_*`` environment: the variable of each flag, the variables
that stand for no flag, ``--help`` text generated from the parser, and the warning for a
variable nothing reads.

Why one module: the variable names are derived from the parser's flags
(``TAMIYO_<DEST>``) in one function, so the help, the warning and
docs/configuration.md (docs/gen_reference.py) cannot disagree with what
``tamiyo_server.cli.parse_config`` reads.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import textwrap
from collections.abc import Mapping

from tamiyo import cli_text
from tamiyo.config import OTHER_VARIABLES

PREFIX = "TAMIYO_"
ENVIRONMENT_ONLY = {
    "TAMIYO_AUTH_TOKEN": "the bearer token clients must send (--auth-token-file wins); "
    "never a flag, since ps shows a command line; set but blank is refused",
}
"""Variables the server reads that stand for no flag: name -> what it is."""


def env_name(dest: str) -> str:
    """The variable of the flag whose argparse ``dest`` this is: ``TAMIYO_<DEST>``."""
    return PREFIX + dest.upper()


class HelpFormatter(cli_text.HelpFormatter):
    """The project's ``--help`` formatter (``tamiyo.cli_text``), where each flag shows its
    variable and the default it would take now, from the parser itself (``TAMIYO_<DEST>``,
    the action's default), so it cannot drift from what ``parse_config`` reads; a default
    that came from the variable says so. (No server flag holds a secret: the token is
    environment-only.)"""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.dest == "help":
            return text
        var = env_name(action.dest)
        shown = "empty" if action.default == "" else "%(default)s"
        source = f" from {var}" if var in os.environ else ""
        return f"{text} [{var}; default: {shown}{source}]"


def epilog() -> str:
    """The ``--help`` text after the flags (the formatter keeps its line breaks)."""

    def rows(names: Mapping[str, str]) -> str:
        return "".join(
            textwrap.fill(f"{name}: {what}", 78, initial_indent="  ", subsequent_indent="    ")
            + "\n"
            for name, what in names.items()
        )

    return (
        "environment only:\n"
        + rows(ENVIRONMENT_ONLY)
        + "other TAMIYO_* variables of the project (not flags):\n"
        + rows(OTHER_VARIABLES)
        + "Any other TAMIYO_* variable is warned about at start (a typo would be ignored).\n"
        "\nThe metrics endpoint (--metrics-port) is plaintext HTTP without authentication,\n"
        "even when the gRPC port has TLS and a token; it binds to --metrics-host (default:\n"
        "the --host address).\n"
        "\nExit status: 0 after a drain (SIGTERM / SIGINT); 2 when the server refuses to\n"
        "start, with one line naming the flag or variable (tamiyo-server: error: ... for\n"
        "a bad value, cannot serve: ... for what the start found: ports, TLS files,\n"
        "directories, the device, a pinned checkpoint)."
    )


_SERVICE_LINK = re.compile(
    r"^TAMIYO\w*_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$"
)
"""The variables Kubernetes injects for a Service whose name starts with ``tamiyo``
(unless the pod sets ``enableServiceLinks: false``, as ``deploy/kubernetes`` does)."""


def unknown_variables(
    p: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning per ``TAMIYO_*`` variable in the environment that nothing in the
    project reads, with the closest known name: a typo in a manifest (the health
    threshold's name misspelt) would otherwise leave the default in force silently."""
    env = os.environ if environ is None else environ
    known = {env_name(a.dest) for a in p._actions if a.option_strings and a.dest != "help"}
    known |= set(ENVIRONMENT_ONLY) | set(OTHER_VARIABLES)
    suffixes = {k.removeprefix(PREFIX): k for k in known}
    out = []
    for name in sorted(env):
        if not name.upper().startswith(PREFIX) or name in known:
            continue
        if _SERVICE_LINK.match(name):  # Kubernetes' own, for a Service named tamiyo[-...]
            continue
        close = difflib.get_close_matches(name[len(PREFIX) :].upper(), suffixes, n=1)
        hint = (
            f"did you mean {suffixes[close[0]]}?"
            if close
            else "tamiyo-server --help lists the variables"
        )
        out.append(f"{name} is set, but nothing in Tamiyo reads it (ignored); {hint}")
    return out
