"""Atomic engine directories (bei/engine/layout.py), without a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bei.engine.layout import STAGING_PREFIX, staged_engine_dir


def _engine(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(text)


def test_success_replaces_the_engine_and_leaves_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "m"
    _engine(target, "old")
    with staged_engine_dir(target) as staging:
        (staging / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "new"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_failure_keeps_the_old_engine_and_removes_staging(tmp_path: Path) -> None:
    target = tmp_path / "m"
    _engine(target, "old")
    with pytest.raises(RuntimeError), staged_engine_dir(target) as staging:
        (staging / "manifest.json").write_text("half")
        raise RuntimeError("export failed")
    assert (target / "manifest.json").read_text() == "old"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_build(tmp_path: Path) -> None:
    target = tmp_path / "m"
    _engine(target, "old")
    os.replace(target, tmp_path / f"{STAGING_PREFIX}m-old-deadbeef")  # the first rename happened, then a kill
    with pytest.raises(RuntimeError), staged_engine_dir(target):
        raise RuntimeError("this build fails too")
    assert (target / "manifest.json").read_text() == "old"


def test_stale_staging_of_a_dead_build_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{STAGING_PREFIX}m-999999999-abcd1234"
    stale.mkdir()
    with staged_engine_dir(tmp_path / "m") as staging:
        (staging / "manifest.json").write_text("new")
    assert not stale.exists()


def test_staging_of_an_engine_with_a_longer_name_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / f"{STAGING_PREFIX}m-cls-{os.getpid() + 1}-abcd1234"  # `m-cls` being built meanwhile
    other.mkdir()
    old_other = tmp_path / f"{STAGING_PREFIX}m-cls-old-abcd1234"
    _engine(old_other, "m-cls engine")
    with staged_engine_dir(tmp_path / "m") as staging:
        (staging / "manifest.json").write_text("new")
    assert other.exists() and old_other.exists()
    assert (tmp_path / "m" / "manifest.json").read_text() == "new"
