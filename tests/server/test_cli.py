"""Server configuration from flags and environment: every bad value stops the server
with one line naming the flag, whichever source it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tamiyo.config import POLICY_RULES
from tamiyo_server.cli import parse_config

BAD = [
    (["--deadline-ms", "0"], "argument --deadline-ms: 0 must be > 0"),
    (["--deadline-ms", "nan"], "argument --deadline-ms: nan must be > 0"),
    (["--max-queue-delay-ms", "-1"], "argument --max-queue-delay-ms: -1 must be >= 0"),
    (["--port", "70000"], "argument --port: 70000 is not in [0, 65535]"),
    (["--port", "-1"], "argument --port: -1 is not in [0, 65535]"),
    (["--metrics-port", "x"], "argument --metrics-port: 'x' is not an integer"),
    (["--grace-s", "-1"], "argument --grace-s: -1 must be >= 0"),
    (["--grace-s", "inf"], "argument --grace-s: inf must be >= 0"),
    (["--torch-threads", "0"], "argument --torch-threads: 0 is not in [1, 1024]"),
    (["--device", "gpu"], "argument --device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    (["--run-batches-on", "gpu"], "argument --run-batches-on: 'gpu' is not auto, loop or"),
    (["--health-threshold", "1.5"], "argument --health-threshold: 1.5 must be >= 0 and <= 1"),
    (["--exploration-epsilon", "-0.1"], "argument --exploration-epsilon: -0.1 must be >= 0"),
    (["--flush-interval-s", "0"], "argument --flush-interval-s: 0 must be > 0"),
    (["--poll-interval-s", "0"], "argument --poll-interval-s: 0 must be > 0"),
    (["--experience-max-total-mb", "-5"], "argument --experience-max-total-mb: -5 must be"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_a_bad_flag_is_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_config(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_a_bad_environment_value_gets_the_same_check(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flag, value = argv
    monkeypatch.setenv("TAMIYO_" + flag.removeprefix("--").replace("-", "_").upper(), value)
    with pytest.raises(SystemExit) as exit_:
        parse_config([])
    env = "TAMIYO_" + flag.removeprefix("--").replace("-", "_").upper()
    assert str(exit_.value.code).startswith(f"{env}={value!r} (for {flag}): ")
    assert message.split(": ", 1)[1] in str(exit_.value.code)


def test_good_values_from_both_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_PORT", "50123")
    monkeypatch.setenv("TAMIYO_DEADLINE_MS", "2500")
    c = parse_config(["--grace-s", "0", "--device", "cuda:1", "--run-batches-on", "loop"])
    assert (c.port, c.grace_s, c.device, c.batch.run_on) == (50123, 0.0, "cuda:1", "loop")
    # a default deadline above the cap on requested ones raises the cap with it
    assert c.batch.decision_deadline_ms == 2500.0
    assert c.batch.max_deadline_ms >= 2500.0
    assert parse_config(["--port", "7"]).port == 7  # the flag wins over the variable
    # and one below the floor on requested ones lowers the floor with it
    low = parse_config(["--deadline-ms", "1.5"]).batch
    assert (low.decision_deadline_ms, low.min_deadline_ms) == (1.5, 1.5)


def test_the_rules_the_operator_set_are_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's serving_rules may set only the rules the operator left alone."""
    monkeypatch.delenv("TAMIYO_HEALTH_THRESHOLD", raising=False)
    monkeypatch.delenv("TAMIYO_EXPLORATION_EPSILON", raising=False)
    assert parse_config([]).operator_rules == frozenset()
    c = parse_config(["--health-threshold", "0.6"])  # (the default value, still set)
    assert c.operator_rules == frozenset({"health_threshold"})
    assert parse_config(["--health", "0.5"]).operator_rules == {"health_threshold"}  # abbrev.
    monkeypatch.setenv("TAMIYO_EXPLORATION_EPSILON", "0.1")
    assert parse_config([]).operator_rules == {"exploration_epsilon"}
    monkeypatch.delenv("TAMIYO_EXPLORATION_EPSILON")
    # every rule a checkpoint may declare has a flag and a variable that win over it
    for rule in POLICY_RULES:
        flag = "--" + rule.replace("_", "-")
        c = parse_config([flag, "0.3"])
        assert (getattr(c.rules, rule), c.operator_rules) == (0.3, frozenset({rule}))
        monkeypatch.setenv(f"TAMIYO_{rule.upper()}", "0.4")
        c = parse_config([])
        assert (getattr(c.rules, rule), c.operator_rules) == (0.4, frozenset({rule}))
        monkeypatch.delenv(f"TAMIYO_{rule.upper()}")


def test_the_token_is_stripped_and_a_missing_token_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAMIYO_AUTH_TOKEN", "s3cret\n")  # as a Secret made from a file
    assert parse_config([]).auth_token == "s3cret"
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match=f"--auth-token-file {missing}: .*No such file"):
        parse_config(["--auth-token-file", str(missing)])


def test_a_cuda_device_this_host_lacks_is_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    run = subprocess.run(
        [sys.executable, "-m", "tamiyo_server", "--port", "0", "--metrics-port", "0",
         "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "cannot serve: --device cuda: this host has 0 usable CUDA device(s)" in run.stderr
    assert "Traceback" not in run.stderr
