"""``tamiyo.cli_text``: every tool's ``--help`` shows defaults, keeps its examples, and
never prints a secret."""

from __future__ import annotations

import argparse

import pytest

from tamiyo.cli_text import HelpFormatter, describe, secret


def test_help_keeps_the_docstring_layout_and_drops_rst_markup() -> None:
    doc = """``make x``: does a thing.

        python -m x --quick    # a smoke run
        python -m x            # the full run
    """
    p = argparse.ArgumentParser(description=describe(doc), formatter_class=HelpFormatter)
    text = p.format_help()
    assert "make x: does a thing." in text
    assert "``" not in text
    assert "    python -m x --quick    # a smoke run\n" in text  # not reflowed into prose


def test_defaults_are_shown_except_empty_ones_and_secrets() -> None:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="frames/s")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--ca", help="PEM CA file")
    secret(p.add_argument("--token", default="s3cret-from-env", help="bearer token"))
    text = p.format_help()
    assert "frames/s (default: 1000.0)" in text
    assert "default: False" not in text
    assert "default: None" not in text
    assert "s3cret" not in text


def test_the_client_tools_never_print_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from tamiyo_client import loadgen

    monkeypatch.setenv("TAMIYO_TOKEN", "s3cret-from-env")
    text = loadgen.build_parser().format_help()
    assert "s3cret" not in text
    assert "--ca" in text
    assert "(default: 16)" in text  # --streams
