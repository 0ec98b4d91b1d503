"""A `bei build` killed mid-export leaves nothing loadable, and never damages an existing engine."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bei.engine.layout import STAGING_PREFIX
from bei.engine.manifest import read_manifest
from bei.errors import EngineError
from tests.servers import (
    BUILD_TIMEOUT_S,
    MINILM_NAME,
    BuiltEngine,
    Server,
    bei_command,
    bei_env,
    cosine,
    minilm_fp32_config,
    run_bei,
)

EXPORT_STARTED = "[3/6] export ..."
EXPORT_DONE = "[3/6] export done"


def kill_build_during_export(engines_dir: Path) -> str:
    """Start `bei build` of the MiniLM config (fp32), SIGKILL it once export has begun; its stderr so far."""
    process = subprocess.Popen(
        bei_command("build", minilm_fp32_config(engines_dir.parent), "--engines-dir", engines_dir),
        env=bei_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if line.startswith(EXPORT_STARTED):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not started.wait(timeout=120):
            pytest.fail("the build never reached the export stage:\n" + "".join(lines))
        time.sleep(1.0)  # well inside the export stage (it takes seconds)
        assert process.poll() is None, "the build ended before it could be killed:\n" + "".join(lines)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert process.returncode == -signal.SIGKILL
    assert EXPORT_DONE not in output, f"the kill came after export finished:\n{output}"
    return output


def staging_folders(engines_dir: Path) -> list[Path]:
    return sorted(engines_dir.glob(f"{STAGING_PREFIX}*"))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of an engine: content hash and modification time."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow  # a MiniLM build of its own, killed during export, then rebuilt: 23 s on two cores
def test_killed_build_leaves_no_loadable_engine(tmp_path: Path, st_model: Any) -> None:
    engines_dir = tmp_path / "engines"
    engine_dir = engines_dir / MINILM_NAME
    kill_build_during_export(engines_dir)

    # the build had started writing (a staging folder), but nothing under the engine's own name
    assert staging_folders(engines_dir), "no staging folder: the build was killed before it wrote anything"
    assert not engine_dir.exists(), f"a killed build left {engine_dir}: {list(engine_dir.iterdir())}"
    with pytest.raises(EngineError):
        read_manifest(engine_dir)

    started = time.monotonic()
    served = run_bei("serve", engine_dir, "--port", "0", timeout=60)
    assert served.returncode != 0
    assert time.monotonic() - started < 60
    assert "error:" in served.stderr and ("not found" in served.stderr or "manifest" in served.stderr), served.stderr
    assert str(engine_dir) in served.stderr

    # A killed build's staging folder does not stop the next build, which cleans it up. The next build
    # here is the one `bei serve --config` runs when no up-to-date engine exists (a user flow of its own).
    config = minilm_fp32_config(tmp_path)
    server = Server(args=["--config", str(config), "--engines-dir", str(engines_dir)], log_path=tmp_path / "serve.log")
    server.start(timeout=BUILD_TIMEOUT_S)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            served_vector = client.post("/embed", json={"inputs": "built by serve"}).json()[0]
    finally:
        server.stop()
    log = server.log()
    assert "building it first" in log, log
    assert "[6/6] write done" in log, log
    assert staging_folders(engines_dir) == [], f"left behind: {staging_folders(engines_dir)}"
    manifest = read_manifest(engine_dir)
    assert manifest.name == MINILM_NAME
    assert (engine_dir / manifest.graph_file).stat().st_size > 1_000_000
    # the engine it built gives the same numbers as sentence-transformers
    expected = st_model.encode(["built by serve"], convert_to_numpy=True)[0]
    assert cosine(served_vector, expected) >= 0.99999


def test_killed_rebuild_keeps_the_old_engine(tmp_path: Path, minilm_build: BuiltEngine) -> None:
    engines_dir = tmp_path / "engines"
    engine_dir = engines_dir / MINILM_NAME
    shutil.copytree(minilm_build.engine_dir, engine_dir)
    before = snapshot(engine_dir)
    manifest_before = read_manifest(engine_dir)

    kill_build_during_export(engines_dir)

    assert snapshot(engine_dir) == before, "a killed rebuild changed the existing engine"
    manifest = read_manifest(engine_dir)
    assert manifest == manifest_before

    # and the old engine still loads and embeds
    from bei.backend import Batch
    from bei.targets.loading import load_engine

    engine = load_engine(engine_dir, threads=1)
    try:
        encoded = [engine.tokenizer.encode("still works", truncate=True)]
        output = engine.backend.infer(Batch.pad(encoded, engine.tokenizer.pad_id, manifest.padding_side))
    finally:
        engine.backend.close()
    assert np.asarray(output).shape == (1, 384)
    assert np.isfinite(output).all()
