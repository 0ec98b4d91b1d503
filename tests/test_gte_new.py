"""GTE in its authors' format (`model_type: new`, gte-base-en-v1.5 / gte-multilingual-base), built by
bei's own implementation on both CPU targets and compared with the authors' forward.

The checkpoints ship `auto_map` remote code (Alibaba-NLP/new-impl's modeling.py), which cannot be
downloaded here and which bei never runs: `NewReference` below writes that forward out from the
published modeling.py (NewEmbeddings with RotaryEmbedding / NTKScalingRotaryEmbedding, NewAttention
with the packed `qkv_proj`, NewGatedMLP, NewLayer's post-norms, NewPooler and the classifiers) and
runs it on the same weights. The tiny checkpoints are transformers' native `gte` ones rewritten in the
authors' format (bei/testing/tiny_models.py `_gte_authors_format`), with the NTK scaling the public
checkpoints use (`rope_scaling: {type: ntk, factor}`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.testing.inproc_server import make_and_build, serve_engine
from bei.testing.tiny_models import GTE_NTK, TEXTS, edit_config
from bei.text.tokenizer import TokenizerRuntime
from tests.compat import ok
from tests.servers import assert_fp32_parity, fp8_plan_away_from_gpu

PAIRS = [(TEXTS[i], TEXTS[(i * 5 + 3) % len(TEXTS)]) for i in range(6)]
CASES = {  # name -> (task, make_checkpoint kwargs)
    "embed": ("embed", {"pooling": "cls", "normalize": True, "gte_new": {"rope_scaling": GTE_NTK}}),
    "embed-no-scaling": ("embed", {"pooling": "cls", "gte_new": {}}),
    "rerank": ("rerank", {"gte_new": {"rope_scaling": GTE_NTK}}),
    "ner": ("ner", {"gte_new": {"rope_scaling": GTE_NTK}}),
}
TARGETS = ("onnxruntime", "torch")


# --- the authors' forward (Alibaba-NLP/new-impl modeling.py), eval mode ----------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(config: dict[str, Any], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RotaryEmbedding / NTKScalingRotaryEmbedding's cos_cached, sin_cached for positions < seq_len."""
    dim = int(config["hidden_size"] / config["num_attention_heads"])
    base, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    max_positions = config["max_position_embeddings"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    cached = max_positions
    if scaling is not None:  # NTKScalingRotaryEmbedding: its cache is built for max_positions * factor
        factor = scaling["factor"]
        cached = max_positions * factor
        if cached > max_positions:  # _set_cos_sin_cache, mixed_b None
            inv_freq = 1.0 / ((base * factor) ** (torch.arange(0, dim, 2).float() / dim))
            inv_freq = inv_freq / factor ** (2 / dim)
    t = torch.arange(max(int(cached), seq_len), dtype=torch.float32)
    freqs = torch.einsum("i,j->ij", t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:seq_len], emb.sin()[:seq_len]


class NewReference(nn.Module):
    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config, self.state = config, state
        self.heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.prefix = "new." if any(k.startswith("new.") for k in state) else ""

    def w(self, name: str) -> torch.Tensor:
        return self.state[self.prefix + name]

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.w(name + ".weight"), self.w(name + ".bias"), self.eps)

    def linear(self, x: torch.Tensor, name: str, prefix: bool = True) -> torch.Tensor:
        get = self.w if prefix else self.state.__getitem__
        bias_key = (self.prefix if prefix else "") + name + ".bias"
        return nn.functional.linear(x, get(name + ".weight"), self.state.get(bias_key))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, seq = input_ids.shape
        x = self.w("embeddings.word_embeddings.weight")[input_ids]
        if c.get("type_vocab_size", 0) > 0:
            x = x + self.w("embeddings.token_type_embeddings.weight")[torch.zeros_like(input_ids)]
        x = self.norm(x, "embeddings.LayerNorm")
        cos, sin = rope_cos_sin(c, seq)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # rope_cos[position_ids].unsqueeze(2)
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # get_extended_attention_mask
        head = c["hidden_size"] // self.heads
        for i in range(c["num_hidden_layers"]):
            layer = f"encoder.layer.{i}"
            q, k, v = (
                t.view(batch, seq, self.heads, head) for t in self.linear(x, f"{layer}.attention.qkv_proj").split(c["hidden_size"], -1)
            )
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(head) + bias
            context = (scores.softmax(-1) @ v.transpose(1, 2)).permute(0, 2, 1, 3).reshape(batch, seq, -1)
            x = self.norm(x + self.linear(context, f"{layer}.attention.o_proj"), f"{layer}.attn_ln")
            up, gate = self.linear(x, f"{layer}.mlp.up_gate_proj").split(c["intermediate_size"], -1)
            mlp = self.linear(nn.functional.gelu(gate) * up, f"{layer}.mlp.down_proj")  # ACT2FN["gelu"]
            x = self.norm(x + mlp, f"{layer}.mlp_ln")
        return x

    def sequence_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.linear(self.hidden(input_ids, attention_mask)[:, 0], "pooler.dense"))  # NewPooler
        return self.linear(pooled, "classifier", prefix=False)

    def token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hidden(input_ids, attention_mask), "classifier", prefix=False)


def reference_for(folder: Path) -> tuple[NewReference, TokenizerRuntime]:
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "new" and "auto_map" in config
    return NewReference(config, load_file(str(folder / "model.safetensors"))), TokenizerRuntime(folder / "tokenizer.json", 64)


def padded(tokenizer: TokenizerRuntime, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer.encode(item, truncate=True) for item in items]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_id)
    mask = torch.zeros((len(encoded), width), dtype=torch.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = torch.tensor(e.ids), 1
    return ids, mask


# --- engines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[tuple[str, str], tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gte-new")
    out = {}
    for name, (task, kwargs) in CASES.items():
        for target in TARGETS:
            checkpoint, engine, _ = make_and_build(str(root), f"{name}-{target}", "gte", task, kwargs, {"target": target})
            out[(name, target)] = (Path(checkpoint), Path(engine))
    return out


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(built: dict[tuple[str, str], tuple[Path, Path]], target: str) -> Iterator[Any]:
    def start(name: str) -> Any:
        return serve_engine(built[(name, target)][1])

    yield start


@pytest.mark.parametrize("name", ["embed", "embed-no-scaling"])
def test_embed(name: str, serve: Any, built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    folder = built[(name, "onnxruntime")][0]
    reference, tokenizer = reference_for(folder)
    with torch.no_grad():
        cls = reference.hidden(*padded(tokenizer, TEXTS))[:, 0]
    want = nn.functional.normalize(cls, dim=-1).numpy()
    with serve(name) as base_url, httpx.Client(base_url=base_url, timeout=60.0) as client:
        assert_fp32_parity(ok(client.post("/embed", json={"inputs": TEXTS})), want, f"{name} /embed")
        info = client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}


def test_ntk_scaling_changes_the_vectors(built: dict[tuple[str, str], tuple[Path, Path]], tmp_path: Path) -> None:
    """The parity above would not notice NTK scaling if it changed nothing at these lengths."""
    folder = tmp_path / "unscaled"
    shutil.copytree(built[("embed", "onnxruntime")][0], folder)
    edit_config(folder, {"rope_scaling": None})
    scaled, tokenizer = reference_for(built[("embed", "onnxruntime")][0])
    unscaled, _ = reference_for(folder)
    with torch.no_grad():
        batch = padded(tokenizer, TEXTS)
        assert (scaled.hidden(*batch) - unscaled.hidden(*batch)).abs().max() > 1e-2


def test_rerank(serve: Any, built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    reference, tokenizer = reference_for(built[("rerank", "onnxruntime")][0])
    with torch.no_grad():
        want = reference.sequence_logits(*padded(tokenizer, [(q, d) for q, d in PAIRS]))[:, 0].numpy()
    query = PAIRS[0][0]
    with torch.no_grad():
        want_query = reference.sequence_logits(*padded(tokenizer, [(query, d) for _, d in PAIRS]))[:, 0].numpy()
    with serve("rerank") as base_url, httpx.Client(base_url=base_url, timeout=60.0) as client:
        predicted = ok(client.post("/predict", json={"inputs": [[q, d] for q, d in PAIRS], "raw_scores": True}))
        assert_fp32_parity([[row[0]["score"]] for row in predicted], want[:, None], "/predict raw scores")
        ranked = ok(client.post("/rerank", json={"query": query, "texts": [d for _, d in PAIRS], "raw_scores": True}))
        by_index = sorted(ranked, key=lambda r: r["index"])
        assert_fp32_parity([[r["score"]] for r in by_index], want_query[:, None], "/rerank raw scores")


def test_ner(serve: Any, built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    folder = built[("ner", "onnxruntime")][0]
    reference, tokenizer = reference_for(folder)
    labels = [json.loads((folder / "config.json").read_text())["id2label"][str(i)] for i in range(9)]
    text = TEXTS[3]
    with torch.no_grad():
        logits = reference.token_logits(*padded(tokenizer, [text]))[0].numpy()
    with serve("ner") as base_url, httpx.Client(base_url=base_url, timeout=60.0) as client:
        tokens = ok(client.post("/predict_tokens", json={"inputs": text, "raw_scores": True}))
    got = np.array([[token["results"][label] for label in labels] for token in tokens])
    special = tokenizer.encode(text, truncate=True).special
    want = logits[[i for i, s in enumerate(special) if not s]]  # /predict_tokens leaves special tokens out
    assert_fp32_parity(got, want, "/predict_tokens raw scores")


def test_detection_and_refusals(built: dict[tuple[str, str], tuple[Path, Path]], tmp_path: Path) -> None:
    folder = built[("embed", "onnxruntime")][0]
    spec = read_model_spec(folder)
    assert (spec.model_type, spec.task, spec.base_model) == ("gte", Task.EMBED, "encoder_bert")
    assert read_model_spec(built[("rerank", "onnxruntime")][0]).task is Task.RERANK
    for edits, match in [
        ({"rope_scaling": {"type": "ntk", "factor": 2.0, "mixed_b": 0.8}}, "mixed_b"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"logn_attention_scale": True}, "logn_attention_scale=True is not supported for new"),
        ({"layer_norm_type": "rms_norm"}, "layer_norm_type='rms_norm'"),
        ({"position_embedding_type": "absolute"}, "position_embedding_type='absolute'"),
        ({"pack_qkv": False}, "pack_qkv=False"),
    ]:
        changed = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, changed)
        edit_config(changed, edits)
        with pytest.raises(ModelError, match=match):
            read_model_spec(changed)


def test_gpu_targets_plan_it(built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    spec = read_model_spec(built[("rerank", "onnxruntime")][0])
    for target in ("tensorrt", "torch"):
        plan = fp8_plan_away_from_gpu(spec, target)
        assert plan.precision == "fp8" and plan.parameters > 0 and len(plan.quantized_layers) >= 8, plan.quantized_layers
