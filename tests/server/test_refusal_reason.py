"""A refused checkpoint's reason does not repeat its path (QA16 N5).

``GetPolicyInfo`` said ``lastRefusedReason: "checkpoint /ckpt/v3 refused: weights are ..."``
next to ``lastRefusedPath: "/ckpt/v3"``. ``PolicyHolder.refuse`` keeps the reason
without the prefix naming the same path; the log line names the path once. The
end-to-end check (a real bad checkpoint through the watcher and GetPolicyInfo) is
``test_reload.test_bad_checkpoint_is_refused_once_and_old_version_keeps_answering``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.checkpoint import CheckpointError, read_manifest
from tamiyo_server.policy_holder import PolicyHolder, ServedPolicy, refusal_reason, serve_loaded


@pytest.fixture(scope="module")
def holder_policy() -> ServedPolicy:
    return serve_loaded(builtin_policy(), "cpu")


def test_the_prefix_naming_the_refused_path_is_dropped(tmp_path: Path) -> None:
    p = str(tmp_path / "v3")
    assert refusal_reason(p, f"checkpoint {p} refused: weights are 12 bytes") == (
        "weights are 12 bytes"
    )
    # the same directory written another way (a symlink, a trailing slash)
    os.symlink(tmp_path, tmp_path / "link")
    other = str(tmp_path / "link" / "v3")
    assert refusal_reason(p, f"checkpoint {other}/ refused: x") == "x"


def test_a_reason_about_another_file_or_without_the_prefix_is_kept(tmp_path: Path) -> None:
    p = str(tmp_path / "v3")
    pointer = str(tmp_path / "latest")
    keep = [
        f"{pointer} names 'gone', which is not a checkpoint directory here",
        f"checkpoint {tmp_path / 'v2'} refused: sha256 mismatch",  # another version
        "weights are 12 bytes",
        "",
    ]
    for reason in keep:
        assert refusal_reason(p, reason) == reason
    assert refusal_reason("", "checkpoint  refused: x") == "checkpoint  refused: x"


def test_refuse_stores_the_bare_reason_and_logs_the_path_once(
    tmp_path: Path, holder_policy: ServedPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "v3"
    bad.mkdir()
    with pytest.raises(CheckpointError) as err:  # the real error's wording
        read_manifest(bad)
    assert str(err.value).startswith(f"checkpoint {bad} refused: ")
    holder = PolicyHolder(holder_policy)
    with caplog.at_level(logging.WARNING, logger="tamiyo_server.policy_holder"):
        holder.refuse(str(bad), str(err.value))
    assert holder.last_refused_path == str(bad)
    assert holder.last_refused_reason.startswith("manifest missing"), holder.last_refused_reason
    assert str(bad) not in holder.last_refused_reason
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"refused checkpoint {bad}: {holder.last_refused_reason}"
    assert line.count(str(bad)) == 1
