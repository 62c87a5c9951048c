"""Run dirs: claiming, resuming and refusing (diffmem.runs)."""

from __future__ import annotations

import pytest

from diffmem.errors import ConfigError
from diffmem.runs import check_claim, claim, digest


def test_key_added_with_null_default_keeps_run_dir_resumable(tmp_path):
    run_dir = tmp_path / "run"
    claim(run_dir, {"model": {"path": "m"}, "seed": 0})
    # a later version adds settings whose defaults are null: the old run dir still resumes
    newer = {"model": {"path": "m", "revision": None}, "seed": 0, "max_targets": None}
    assert check_claim(run_dir, newer)
    assert claim(run_dir, newer) == run_dir
    assert digest(newer) == digest({"model": {"path": "m"}, "seed": 0})
    # ...but a value that is set, or changed, is another config
    with pytest.raises(ConfigError, match=r"max_targets: None there, 4 now"):
        check_claim(run_dir, {**newer, "max_targets": 4})
    with pytest.raises(ConfigError, match=r"seed: 0 there, 1 now"):
        check_claim(run_dir, {**newer, "seed": 1})


def test_unclaimed_dir_is_not_created(tmp_path):
    assert not check_claim(tmp_path / "absent", {"seed": 0})
    assert not (tmp_path / "absent").exists()
