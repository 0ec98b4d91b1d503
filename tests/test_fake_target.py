"""A target added from outside bei (tests/fake_target: one folder, one `registry.register` line in
a fixture) is built by `bei build --target` and served by the real server, with no other file
edited: the registry is the only place bei learns of targets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from bei import cli
from bei.engine.manifest import read_manifest
from bei.targets import registry
from bei.testing.inproc_server import config_for, serve_engine
from bei.text.tokenizer import TokenizerRuntime
from tests import fake_target


@pytest.fixture
def fake_registered() -> Iterator[None]:
    registry.register(fake_target.TARGET)
    yield
    registry.unregister(fake_target.NAME)


def test_a_registered_target_builds_and_serves_end_to_end(
    fake_registered: None, tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint_factory("bert", "embed")
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(config_for("tiny-fake", checkpoint, "encoder_bert")))
    engines = tmp_path / "engines"

    assert cli.main(["build", str(config), "--target", fake_target.NAME, "--engines-dir", str(engines)]) == 0
    progress = capsys.readouterr().err
    assert f"target {fake_target.NAME}: asked for with --target" in progress
    assert "[4/5] verify done" in progress and "[5/5] write done" in progress
    manifest = read_manifest(engines / "tiny-fake")
    assert manifest.target.name == fake_target.NAME and manifest.graph_file == fake_target.TABLE_FILE

    texts = ["Hello world.", "the cat reads a book in Paris"]
    with serve_engine(engines / "tiny-fake") as base_url:
        info = httpx.get(f"{base_url}/info", timeout=30).json()
        response = httpx.post(f"{base_url}/v1/embeddings", json={"input": texts, "model": "tiny-fake"}, timeout=30)
    assert info["backend"] == fake_target.NAME
    assert response.status_code == 200, response.text
    got = np.array([row["embedding"] for row in response.json()["data"]])

    # what the engine must compute: the mean of the tokens' rows of the checkpoint's own table
    table = np.load(engines / "tiny-fake" / fake_target.TABLE_FILE)
    tokenizer = TokenizerRuntime(engines / "tiny-fake" / "tokenizer.json", manifest.max_input_tokens)
    want = np.stack([table[tokenizer.encode(t, truncate=True).ids].mean(axis=0) for t in texts])
    if manifest.normalize:
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_registry_forgets_an_unregistered_target(fake_registered: None) -> None:
    assert fake_target.NAME in registry.names()
    registry.unregister(fake_target.NAME)
    assert fake_target.NAME not in registry.names()
    registry.register(fake_target.TARGET)  # the fixture unregisters it again
