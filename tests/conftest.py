"""Shared test setup: offline Hugging Face, and tiny random checkpoints (see bei/testing/tiny_models.py)."""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE once, at its first import: set it before any test module imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


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
