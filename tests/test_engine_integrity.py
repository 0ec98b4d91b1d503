"""A broken engine never serves: file hashes recorded at build and checked at load, a typed manifest
whose files stay inside the engine folder, `bei serve` exiting non-zero naming the file, `bei serve
--config` rebuilding a corrupt engine, engines without hashes loading with a warning, and no server
path ever reaching a client."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from bei import cli
from bei.errors import EngineError
from tests.servers import bei_command, bei_env, free_port

NAME = "tiny-integrity"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, engine) of a tiny bert embedder built for the ONNX Runtime CPU target."""
    from bei.testing.inproc_server import make_and_build

    root = tmp_path_factory.mktemp("integrity")
    checkpoint, engine_dir, _ = make_and_build(str(root), NAME, "bert", "embed", {"pooling": "mean"}, {})
    return Path(checkpoint), Path(engine_dir)


@pytest.fixture()
def copy(engine: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the engine, to break."""
    return Path(shutil.copytree(engine[1], tmp_path / NAME))


def _edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _legacy(folder: Path) -> None:
    """As built before bei recorded file hashes."""

    def strip(data: dict) -> None:
        data.pop("engine_files")
        data.pop("manifest_sha256")

    _edit_manifest(folder, strip)


def test_build_records_every_file_hash(engine: tuple[Path, Path]) -> None:
    from bei.checkpoint import sha256_file
    from bei.engine.manifest import manifest_digest

    data = json.loads((engine[1] / "manifest.json").read_text())
    files = data["engine_files"]
    on_disk = {p.relative_to(engine[1]).as_posix() for p in engine[1].rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk and {"model.onnx", "tokenizer.json"} <= set(files)
    assert all(files[name] == sha256_file(engine[1] / name) for name in files)
    assert data["manifest_sha256"] == manifest_digest(data)


def _truncate(folder: Path) -> None:
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])


def _swap_tokenizer(folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)
    data["model"]["vocab"] = dict(zip(names, reversed(sorted(vocab.values())), strict=True))  # ids reversed
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _outside(folder: Path) -> None:
    (folder.parent / "elsewhere.onnx").write_bytes((folder / "model.onnx").read_bytes())
    _edit_manifest(folder, lambda d: d.update(graph_file="../elsewhere.onnx"))


def _symlink_out(folder: Path) -> None:
    (folder.parent / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(folder.parent / "tokenizer.json")


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated graph": (_truncate, "model.onnx is not the file that was built"),
    "missing tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "swapped tokenizer": (_swap_tokenizer, "tokenizer.json is not the file that was built"),
    "edited task": (lambda f: _edit_manifest(f, lambda d: d.update(task="rerank")), "task 'rerank' does not fit"),
    "edited limit": (
        lambda f: _edit_manifest(f, lambda d: d.update(max_input_tokens=d["max_input_tokens"] // 2)),
        "manifest.json was edited",
    ),
    "bogus task": (lambda f: _edit_manifest(f, lambda d: d.update(task="bogus")), "task"),
    "graph outside": (_outside, "not a relative path inside the engine folder"),
    "absolute graph": (lambda f: _edit_manifest(f, lambda d: d.update(graph_file=str(f / "model.onnx"))), "not a relative path inside"),
    "symlink out": (_symlink_out, "tokenizer.json points outside the engine folder"),
    "legacy, missing tokenizer": (lambda f: (_legacy(f), (f / "tokenizer.json").unlink()), "tokenizer.json is missing"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_bei_serve_refuses_a_broken_engine(case: str, copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bei serve` exits 1 before it listens, naming the file (run in this process: no port is opened)."""
    breaking, message = BREAKS[case]
    breaking(copy)
    assert cli.main(["serve", str(copy), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert message in err, err


def test_a_broken_engine_exits_bei_serve_process(copy: Path) -> None:
    """The real process: a truncated graph ends `bei serve` with status 1 and the file named."""
    _truncate(copy)
    done = subprocess.run(
        bei_command("serve", copy, "--port", str(free_port())), env=bei_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "model.onnx is not the file that was built" in done.stderr, done.stderr


def test_a_legacy_engine_that_fails_to_load_stops_the_server(copy: Path) -> None:
    """No hashes to catch it: the graph fails in ONNX Runtime, after the server started. The process
    exits 1 (no /health 503 forever), and what clients could read before never holds a path."""
    _legacy(copy)
    _truncate(copy)
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        bei_command("serve", copy, "--port", str(port)), env=bei_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        while process.poll() is None and time.monotonic() - started < 120:
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).text)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 1, output
    assert "failed to load" in output and "built before bei recorded the hashes" in output, output
    assert all(str(copy) not in text and "onnxruntime" not in text.lower() for text in seen), seen


def test_client_never_reads_the_load_error(copy: Path) -> None:
    """In the app itself: /health and requests answer 503 with no path and no runtime internals."""
    from starlette.testclient import TestClient

    from bei.api.app import app_for_engine
    from bei.settings import ServeSettings

    _legacy(copy)
    _truncate(copy)
    with TestClient(app_for_engine(copy, ServeSettings(engine_threads=1))) as client:
        deadline = time.monotonic() + 60
        while (health := client.get("/health")).status_code == 503 and "failed" not in health.text and time.monotonic() < deadline:
            time.sleep(0.05)
        embed = client.post("/embed", json={"inputs": "hello"})
    for response in (health, embed):
        assert response.status_code == 503 and "failed to load" in response.text, response.text
        assert str(copy) not in response.text and "onnx" not in response.text.lower() and "/" not in response.json()["error"]


def test_a_legacy_engine_serves_with_a_warning(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bei.testing.inproc_server import serve_engine

    _legacy(copy)
    with caplog.at_level(logging.WARNING, logger="bei"), serve_engine(copy) as base_url:
        response = httpx.post(f"{base_url}/embed", json={"inputs": "hello"}, timeout=60)
    assert response.status_code == 200, response.text
    assert "built before bei recorded the hashes of its files" in caplog.text


def test_serve_config_rebuilds_a_corrupt_engine(engine: tuple[Path, Path], tmp_path: Path) -> None:
    from bei.testing.inproc_server import config_for

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(NAME, engine[0], "encoder_bert")))
    root = tmp_path / "engines"
    shutil.copytree(engine[1], root / NAME)
    assert cli._up_to_date_engine(config, root) == root / NAME
    (root / NAME / "tokenizer.json").write_text((root / NAME / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNK2]"', 1))
    assert cli._up_to_date_engine(config, root) is None  # the fingerprint matches, the files do not: rebuilt
    shutil.rmtree(root / NAME)
    shutil.copytree(engine[1], root / NAME)
    _legacy(root / NAME)
    assert cli._up_to_date_engine(config, root) is None  # no hashes to check: rebuilt
    assert cli.main(["build", str(config), "--engines-dir", str(root), "--quiet"]) == 0
    assert cli._up_to_date_engine(config, root) == root / NAME


def test_manifest_paths_stay_inside() -> None:
    from bei.engine.manifest import inside_path

    for bad in ("../x", "/etc/passwd", "a/../../b", "", "~/x", "a\\..\\b"):
        with pytest.raises(ValueError):
            inside_path(bad)
    assert inside_path("model.onnx") == "model.onnx" and inside_path("1_Dense/w.bin") == "1_Dense/w.bin"


def test_engine_path_refuses_symlinks_out(tmp_path: Path) -> None:
    from bei.engine.integrity import engine_path

    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "link").symlink_to(tmp_path)
    with pytest.raises(EngineError, match="points outside"):
        engine_path(tmp_path / "engine", "link/secret")


def test_a_full_disk_during_a_build_is_a_clear_error_and_leaves_nothing(
    engine: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from bei.engine.integrity import verify_engine
    from bei.engine.manifest import Manifest, read_manifest

    checkpoint, built = engine
    root = tmp_path / "engines"
    shutil.copytree(built, root / NAME)  # an engine built before, which the failed build must not touch
    before = {p.name: p.read_bytes() for p in (root / NAME).iterdir() if p.is_file()}
    config = tmp_path / "config.yaml"
    repo = {"source": "LOCAL", "repo": str(checkpoint)}
    config.write_text(yaml.safe_dump({"model_name": NAME, "trt_llm": {"build": {"checkpoint_repository": repo, "cpu_precision": "fp32"}}}))

    def disk_full(self: Manifest, folder: Path) -> None:  # the write step: the staging folder holds the graph already
        assert (folder / "model.onnx").is_file()
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "manifest.json"))

    monkeypatch.setattr(Manifest, "write", disk_full)
    assert cli.main(["build", str(config), "--engines-dir", str(root), "--target", "onnxruntime", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"error: no space left on the device (or over quota) while building {root / NAME}" in err
    assert "Traceback" not in err
    assert [p.name for p in root.iterdir()] == [NAME]  # no staging folder left behind
    assert {p.name: p.read_bytes() for p in (root / NAME).iterdir() if p.is_file()} == before
    assert verify_engine(root / NAME, read_manifest(root / NAME)) is None

    long_name = tmp_path / "long.yaml"
    long_name.write_text(config.read_text().replace(f"model_name: {NAME}", "model_name: " + "m" * 250))
    assert cli.main(["build", str(long_name), "--engines-dir", str(root), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model_name: the engine name" in err and "250 characters; at most 100" in err and "Traceback" not in err
