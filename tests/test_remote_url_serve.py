"""REMOTE_URL checkpoints end to end, against a real http.server on 127.0.0.1 serving a tiny model's tarball:

- a build whose server cannot be reached uses the cached extraction of an earlier download, and says so;
- `bei serve --config` revalidates the URL at start (a conditional request: If-None-Match, answered
  304 while the tarball is unchanged), serves the engine it has while the tarball is the one the engine
  was built from (or the server cannot be reached), and rebuilds when another tarball is behind the URL.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from bei import cli
from bei.engine.manifest import read_manifest
from tests.servers import Server, cosine
from tests.tarballs import ETagServer, tarball_bytes

NAME = "remote-tiny"


@dataclass(frozen=True)
class Remote:
    url: str  # of the tarball ETagServer serves
    stop: Callable[[], None]  # closes its port: it cannot be reached any more
    checkpoint: Callable[..., Path]  # tiny_checkpoint_factory
    tmp_path: Path


@pytest.fixture
def remote(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    """ETagServer on 127.0.0.1; the REMOTE_URL cache under tmp_path (HOME)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ETagServer.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ETagServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped = True

    yield Remote(f"http://127.0.0.1:{server.server_address[1]}/tiny.tar.gz", stop, tiny_checkpoint_factory, tmp_path)
    stop()


def write_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "config.yaml"
    build = {"base_model": "encoder_bert", "checkpoint_repository": {"source": "REMOTE_URL", "repo": url}, "cpu_precision": "fp32"}
    config.write_text(yaml.safe_dump({"model_name": NAME, "trt_llm": {"build": build}}))
    return config


def build(config: Path, engines: Path) -> None:
    assert cli.main(["build", str(config), "--engines-dir", str(engines), "--target", "onnxruntime"]) == 0


def test_an_unreachable_server_builds_from_the_cached_extraction(remote: Remote, capfd: pytest.CaptureFixture[str]) -> None:
    tmp_path = remote.tmp_path
    ETagServer.body = tarball_bytes(remote.checkpoint("bert", "embed"))
    config = write_config(tmp_path, remote.url)
    build(config, tmp_path / "first")
    remote.stop()  # the port is closed now: the server cannot be reached
    capfd.readouterr()
    build(config, tmp_path / "second")
    err = capfd.readouterr().err
    assert "cannot reach" in err and "using the cached extraction" in err, err
    first, second = (read_manifest(tmp_path / where / NAME) for where in ("first", "second"))
    assert second.source.revision == first.source.revision == "sha256:" + hashlib.sha256(ETagServer.body).hexdigest()
    assert second.source.file_hashes == first.source.file_hashes
    assert [status for _, status in ETagServer.seen] == [200]


def test_serve_config_revalidates_the_url_and_rebuilds_a_changed_tarball(remote: Remote, capfd: pytest.CaptureFixture[str]) -> None:
    from sentence_transformers import SentenceTransformer

    tmp_path = remote.tmp_path
    first, second = remote.checkpoint("bert", "embed"), remote.checkpoint("bert", "embed", seed=1)
    ETagServer.body = tarball_bytes(first)
    config, engines = write_config(tmp_path, remote.url), tmp_path / "engines"
    build(config, engines)
    assert cli._up_to_date_engine(config, engines) == engines / NAME  # unchanged: served as built
    assert ETagServer.seen[-1][0] is not None and ETagServer.seen[-1][1] == 304  # one conditional request

    ETagServer.body = tarball_bytes(second)  # another model behind the same URL
    capfd.readouterr()
    assert cli._up_to_date_engine(config, engines) is None
    assert "changed since its engine was built: rebuilding it" in capfd.readouterr().err

    server = Server(args=["--config", str(config), "--engines-dir", str(engines)], log_path=tmp_path / "serve.log")
    server.start(timeout=300)
    try:
        vector = httpx.post(f"{server.base_url}/embed", json={"inputs": "a changed tarball"}, timeout=60).json()[0]
    finally:
        server.stop()
    assert "building it first" in server.log(), server.log()
    want = SentenceTransformer(str(second), device="cpu").encode(["a changed tarball"], convert_to_numpy=True)[0]
    assert cosine(vector, want) >= 0.99999
    rebuilt = read_manifest(engines / NAME)
    assert rebuilt.source.revision == "sha256:" + hashlib.sha256(ETagServer.body).hexdigest()
    assert not np.isclose(cosine(vector, SentenceTransformer(str(first), device="cpu").encode(["a changed tarball"])[0]), 1.0)

    remote.stop()  # unreachable: the cached extraction is the engine's checkpoint, served as it is
    capfd.readouterr()
    assert cli._up_to_date_engine(config, engines) == engines / NAME
    assert "using the cached extraction" in capfd.readouterr().err
    for entry in (tmp_path / "home" / ".cache" / "bei" / "remote").iterdir():  # nothing cached either: a warning
        (entry / "source.json").unlink()
    assert cli._up_to_date_engine(config, engines) == engines / NAME
    assert "cannot revalidate the checkpoint" in capfd.readouterr().err
