"""`pip install bei` (no `build` extra) serves ONNX Runtime engines: a `bei serve` process in which
torch, transformers, onnx, onnxscript, safetensors and huggingface_hub cannot be imported serves a
real engine over HTTP, and its `bei build` says which extra to install."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from bei import cli
from bei.targets.loading import load_engine
from bei.testing.inproc_server import config_for

BUILD_ONLY = ("torch", "transformers", "onnx", "onnxscript", "safetensors", "huggingface_hub", "sentence_transformers")
# runs `bei ARGS...` with the build-only packages made unimportable, as in an install without the extra
WITHOUT_BUILD_EXTRA = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BUILD_ONLY!r}:
            raise ImportError(f"{{name}} is not installed")
        return None
sys.meta_path.insert(0, Blocked())
from bei.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serving_needs_no_build_extra(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint_factory("bert", "embed")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_for("tiny-serve", checkpoint, "encoder_bert")))
    assert cli.main(["build", str(config), "--engines-dir", str(tmp_path / "engines"), "--quiet"]) == 0
    engine = tmp_path / "engines" / "tiny-serve"

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_BUILD_EXTRA, "serve", str(engine), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["Hello world", "A"]}, timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert response.status_code == 200, response.text
    loaded = load_engine(engine)  # the same engine in this process, where torch is importable
    from bei.backend import Batch

    encoded = [loaded.tokenizer.encode(t, truncate=True) for t in ["Hello world", "A"]]
    want = loaded.backend.infer(Batch.pad(encoded, loaded.tokenizer.pad_id))
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(response.json()), want, rtol=1e-4, atol=1e-5)


def test_build_without_the_extra_names_it(tmp_path: Path, tiny_checkpoint_factory: Callable[..., Path]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_for("tiny", tiny_checkpoint_factory("bert", "embed"), "encoder_bert")))
    result = subprocess.run([sys.executable, "-c", WITHOUT_BUILD_EXTRA, "build", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'bei[build]'" in result.stderr and "torch" in result.stderr


@pytest.mark.parametrize("name", BUILD_ONLY[:5])
def test_the_build_extra_holds_what_serving_does_not_import(name: str) -> None:
    """pyproject's base dependencies leave the build-only packages to the `build` extra."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    pin = name.replace("_", "-")
    assert not any(d.startswith(pin + "==") for d in project["dependencies"]), f"{pin} is a base dependency"
    assert any(d.startswith(pin + "==") for d in project["optional-dependencies"]["build"]), f"{pin} is not in the build extra"
