"""The operator docs stay true: generated references are fresh, and every flag, env var
and metric the code defines is documented.

Why: docs/configuration.md and docs/metrics.md are generated from the server's parser,
``tamiyo/config.py`` and the metrics registry by ``docs/gen_reference.py``; when someone
adds a flag or a metric and forgets to regenerate, this fails and says how to fix it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tamiyo_server.cli import build_parser
from tamiyo_server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_generated_references_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "gen_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_flag_and_env_var_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for action in build_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest == "help":
            continue
        assert f"`{', '.join(action.option_strings)}`" in text
        assert f"`TAMIYO_{action.dest.upper()}`" in text


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    registry = ServerMetrics().registry
    names = {m.name for m in registry.collect()}
    assert len(names) >= 10
    for name in names:
        assert f"`{name}" in text, name


def test_operator_docs_exist_and_are_linked() -> None:
    for name in ("configuration.md", "metrics.md", "runbook.md", "scale-out.md"):
        assert (DOCS / name).is_file(), name
    readme = (ROOT / "README.md").read_text()
    assert "docs/runbook.md" in readme
    runbook = (DOCS / "runbook.md").read_text().lower()
    for topic in ("reload", "rollback", "overload", "drain"):
        assert f"## {topic}" in runbook, topic
