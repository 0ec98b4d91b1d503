"""Atomic engine directories: a build writes into a hidden staging folder next to the target and
renames it into place only when complete, so an interrupted build never leaves a loadable engine."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".staging-"


def _pattern(name: str, middle: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(STAGING_PREFIX + name)}-{middle}-[0-9a-f]{{8}}")


def staging_dirs(engines_root: Path, name: str) -> list[Path]:
    """This engine's staging folders (`.staging-<name>-<pid>-<hex>`), not those of `<name>-other`."""
    pattern = _pattern(name, r"\d+")
    return sorted(p for p in engines_root.glob(f"{STAGING_PREFIX}{name}-*") if pattern.fullmatch(p.name))


@contextmanager
def staged_engine_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target`, on any failure it is removed.

    Staging folders left by a killed build (no chance to clean up) are removed by the next build.
    """
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_swap(target)
    for stale in staging_dirs(target.parent, target.name):
        if not _owner_alive(stale, target.name):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _restore_interrupted_swap(target: Path) -> None:
    """A build killed between its two renames leaves the old engine set aside: put it back."""
    if target.exists():
        return
    pattern = _pattern(target.name, "old")
    for old in sorted(target.parent.glob(f"{STAGING_PREFIX}{target.name}-old-*")):
        if pattern.fullmatch(old.name) and (old / "manifest.json").exists():
            os.replace(old, target)
            return


def _owner_alive(staging: Path, name: str) -> bool:
    """Whether the build that made `staging` (pid in its name) is still running."""
    pid_part = staging.name.removeprefix(f"{STAGING_PREFIX}{name}-").split("-", 1)[0]
    if not pid_part.isdigit() or int(pid_part) == os.getpid():
        return False
    try:
        os.kill(int(pid_part), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f"{STAGING_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
