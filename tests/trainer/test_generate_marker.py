"""``pipeline.generate`` reuses a behaviour store only when it was generated from the same
recipe (review finding 2: a changed ε, horizon or episode count silently trained on the
old data while the report claimed the new configuration)."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tamiyo.config import SimicConfig
from tamiyo.experience import ExperienceReader
from trainer.pipeline import generate

SMALL = SimicConfig(horizon=4, train_sizes=(4, 6))


def _sessions_and_versions(path: Path) -> tuple[int, set[str]]:
    decisions = list(ExperienceReader([path]).decisions())
    return len({d.session_id for d in decisions}), {d.policy_version for d in decisions}


def test_a_changed_recipe_regenerates_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "behaviour.sqlite"
    generate(path, range(0, 2), SMALL.train_sizes, SMALL)
    assert _sessions_and_versions(path) == (2, {"simic-behaviour-eps0.1"})
    marker = json.loads(path.with_name(path.name + ".complete").read_text())
    assert marker["episodes"] == 2
    assert marker["simic"]["behaviour_epsilon"] == 0.1
    capsys.readouterr()

    generate(path, range(0, 2), SMALL.train_sizes, SMALL)  # same recipe: reused
    assert "reusing" in capsys.readouterr().out

    changed = replace(SMALL, behaviour_epsilon=0.5, horizon=6)
    generate(path, range(0, 3), changed.train_sizes, changed)
    log = capsys.readouterr().out
    assert "regenerating" in log
    for what in ("episodes: 2 → 3", "simic.behaviour_epsilon: 0.1 → 0.5", "simic.horizon"):
        assert what in log
    assert _sessions_and_versions(path) == (3, {"simic-behaviour-eps0.5"})


def test_an_old_or_missing_marker_is_not_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "behaviour.sqlite"
    generate(path, range(0, 2), SMALL.train_sizes, SMALL)
    marker = path.with_name(path.name + ".complete")
    marker.write_text(json.dumps({"episodes": 2}))  # the marker of the old pipeline
    capsys.readouterr()
    generate(path, range(0, 2), SMALL.train_sizes, SMALL)
    assert "regenerating" in capsys.readouterr().out
    marker.unlink()  # an interrupted generation leaves data without a marker
    generate(path, range(0, 2), SMALL.train_sizes, SMALL)
    assert "no completion marker" in capsys.readouterr().out
    assert json.loads(marker.read_text())["episodes"] == 2


_SIMIC_FIELDS = [f.name for f in fields(SimicConfig)]


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(_SIMIC_FIELDS), start=st.integers(0, 5), n=st.integers(1, 5))
def test_every_simic_field_seed_and_size_is_part_of_the_recipe(
    field: str, start: int, n: int
) -> None:
    from trainer.pipeline import data_recipe, recipe_differences

    base = SimicConfig()
    value = getattr(base, field)
    if isinstance(value, tuple):
        changed_value: Any = (*value, value[-1])
    elif isinstance(value, bool):
        changed_value = not value
    elif isinstance(value, int | float):
        changed_value = value + 1
    else:
        changed_value = f"{value}x"
    changed = replace(base, **{field: changed_value})
    seeds = range(start, start + n)
    same = data_recipe(seeds, base.train_sizes, base)
    assert recipe_differences(same, data_recipe(seeds, base.train_sizes, base)) == []
    diff = recipe_differences(same, data_recipe(seeds, base.train_sizes, changed))
    assert any(d.startswith(f"simic.{field}:") for d in diff)
    assert recipe_differences(same, data_recipe(range(start + 1, start + n + 1),
                                                base.train_sizes, base))  # fmt: skip
    assert recipe_differences(same, data_recipe(seeds, (4, 7), base))


def test_the_rules_and_the_state_building_code_are_part_of_the_recipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The behaviour policy's heuristic follows RuleConfig's defaults, and the logged
    states are built by tamiyo/policy and tamiyo/signal_columns.py: a change to either
    changes the data, so it must change the recipe (review 13, finding 5)."""
    import tamiyo.config
    from trainer import behaviour_data
    from trainer.pipeline import data_recipe, recipe_differences

    base = SimicConfig()
    seeds = range(0, 3)
    before = data_recipe(seeds, base.train_sizes, base)
    veto_off = replace(tamiyo.config.RuleConfig(), health_threshold=1.0)
    monkeypatch.setattr(behaviour_data, "RuleConfig", lambda: veto_off)
    diff = recipe_differences(before, data_recipe(seeds, base.train_sizes, base))
    assert diff == ["rules.health_threshold: 0.6 → 1.0"]
    hashed = set(behaviour_data._GENERATOR_SOURCES)
    assert {"tamiyo/policy", "tamiyo/signal_columns.py", "tamiyo/config.py"} <= hashed
