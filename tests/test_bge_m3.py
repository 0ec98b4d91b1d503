"""bge-m3's three outputs from one engine, on both CPU targets, against FlagEmbedding's semantics.

A tiny random XLM-RoBERTa checkpoint with bge-m3's files (CLS pooling, Normalize, `sparse_linear.pt`,
`colbert_linear.pt`) is built for the ONNX Runtime and the torch target and served over HTTP:

- dense:   /v1/embeddings and /embed vs `SentenceTransformer.encode` and the reference's CLS vector;
- sparse:  /embed_sparse vs the reference's lexical weights (max per token id, special tokens dropped);
- ColBERT: /embed_all vs the reference's normalized vectors of every token after CLS.

The reference (`m3_reference`) re-implements FlagEmbedding's BGEM3FlagModel (FlagEmbedding's
`BGEM3Model.dense_embedding` / `sparse_embedding` / `colbert_embedding` and `BGEM3FlagModel.encode`'s
`_process_token_weights` / `_process_colbert_vecs`) over transformers' XLMRobertaModel on the same weights:
FlagEmbedding itself needs peft, datasets and accelerate, which this environment does not carry.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.testing.inproc_server import make_and_build, serve_engine
from bei.testing.tiny_models import TEXTS, make_checkpoint
from tests.compat import ok
from tests.servers import assert_fp32_parity, fp8_plan_away_from_gpu

MAX_ABS_DIFF = 1e-4
# repeated token ids (the sparse weight is the largest of their weights) and special tokens in the text
INPUTS = [*TEXTS[:6], "the cat and the dog and the bird and the cat", "<s> a </s> b"]
M3 = {"pooling": "cls", "normalize": True, "bge_m3": True}


@dataclass(frozen=True)
class Reference:
    dense: np.ndarray  # [inputs, hidden], normalized
    sparse: list[dict[int, float]]  # token id -> weight
    colbert: list[np.ndarray]  # [tokens - 1, colbert_dim], normalized


def m3_reference(folder: Path, texts: list[str]) -> Reference:
    """FlagEmbedding's BGEM3FlagModel.encode(return_dense, return_sparse, return_colbert_vecs) on `folder`."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    hidden = model.config.hidden_size
    sparse_linear = torch.nn.Linear(hidden, 1)
    sparse_linear.load_state_dict(torch.load(folder / "sparse_linear.pt", map_location="cpu", weights_only=True))
    colbert_linear = torch.nn.Linear(hidden, hidden)
    colbert_linear.load_state_dict(torch.load(folder / "colbert_linear.pt", map_location="cpu", weights_only=True))
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        last = model(**batch).last_hidden_state
        dense = torch.nn.functional.normalize(last[:, 0], dim=-1)  # dense_embedding, pooling "cls"
        token_weights = torch.relu(sparse_linear(last))  # sparse_embedding(return_embedding=False)
        colbert = colbert_linear(last[:, 1:]) * batch["attention_mask"][:, 1:][:, :, None].float()  # colbert_embedding
        colbert = torch.nn.functional.normalize(colbert, dim=-1)
    unused = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    sparse: list[dict[int, float]] = []
    vectors: list[np.ndarray] = []
    for i in range(len(texts)):
        result: dict[int, float] = {}
        for w, idx in zip(token_weights[i].squeeze(-1).tolist(), batch["input_ids"][i].tolist(), strict=True):
            if idx not in unused and w > 0 and w > result.get(idx, 0):  # _process_token_weights
                result[idx] = w
        sparse.append(result)
        tokens = int(batch["attention_mask"][i].sum())
        vectors.append(colbert[i, : tokens - 1].numpy())  # _process_colbert_vecs
    return Reference(dense.numpy(), sparse, vectors)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, tuple[Path, Path]]:
    """(checkpoint, engine) of the bge-m3 tiny checkpoint, per CPU target."""
    root = tmp_path_factory.mktemp("bge-m3")
    out = {}
    for target in ("onnxruntime", "torch"):
        checkpoint, engine, _ = make_and_build(str(root), f"m3-{target}", "xlm-roberta", "embed", M3, {"target": target})
        out[target] = (Path(checkpoint), Path(engine))
    return out


@pytest.fixture(scope="module")
def reference(built: dict[str, tuple[Path, Path]]) -> Reference:
    return m3_reference(built["onnxruntime"][0], INPUTS)


@pytest.fixture(params=["onnxruntime", "torch"])
def client(request: pytest.FixtureRequest, built: dict[str, tuple[Path, Path]]) -> Iterator[httpx.Client]:
    with serve_engine(built[request.param][1]) as base_url, httpx.Client(base_url=base_url, timeout=60.0) as http:
        yield http


def test_detected_as_bge_m3(built: dict[str, tuple[Path, Path]]) -> None:
    spec = read_model_spec(built["onnxruntime"][0])
    assert (spec.task, spec.colbert_dim, spec.embedding_dim) == (Task.EMBED_M3, spec.hidden_size, spec.hidden_size)


def test_dense(client: httpx.Client, reference: Reference, built: dict[str, tuple[Path, Path]]) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(built["onnxruntime"][0]), device="cpu").encode(INPUTS, convert_to_numpy=True)
    assert_fp32_parity(reference.dense, st, "the reference's dense vectors vs sentence-transformers")
    openai = ok(client.post("/v1/embeddings", json={"input": INPUTS}))
    assert_fp32_parity([d["embedding"] for d in openai["data"]], reference.dense, "/v1/embeddings")
    assert_fp32_parity(ok(client.post("/embed", json={"inputs": INPUTS})), reference.dense, "/embed")
    info = client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}


def test_sparse(client: httpx.Client, reference: Reference) -> None:
    answer = ok(client.post("/embed_sparse", json={"inputs": INPUTS}))
    assert len(answer) == len(INPUTS)
    repeated = ok(client.post("/tokenize", json={"inputs": INPUTS[-2], "add_special_tokens": False}))[0]
    assert len({t["id"] for t in repeated}) < len(repeated), "the text must repeat token ids"
    assert all(reference.sparse)
    for i, (row, want) in enumerate(zip(answer, reference.sparse, strict=True)):
        indices = [item["index"] for item in row]
        assert indices == sorted(want), f"row {i}: token ids {indices} != reference {sorted(want)}"
        got = np.array([item["value"] for item in row])
        assert np.abs(got - np.array([want[j] for j in indices])).max(initial=0.0) <= MAX_ABS_DIFF, f"row {i} weights"
    # neither <s> nor </s> is a term, not even where the text spells them
    assert not {0, 2} & {item["index"] for item in answer[-1]}


def test_colbert(client: httpx.Client, reference: Reference) -> None:
    answer = ok(client.post("/embed_all", json={"inputs": INPUTS}))
    assert len(answer) == len(INPUTS)
    for i, (vectors, want) in enumerate(zip(answer, reference.colbert, strict=True)):
        assert_fp32_parity(vectors, want, f"/embed_all row {i}")
    single = ok(client.post("/embed_all", json={"inputs": INPUTS[1]}))
    assert_fp32_parity(single[0], reference.colbert[1], "/embed_all of one string")


def test_routes_of_other_tasks_are_refused(client: httpx.Client) -> None:
    response = client.post("/predict", json={"inputs": "a"})
    assert response.status_code in (400, 404, 422), response.text
    assert "/embed_all" in response.text


def test_checkpoints_bei_refuses(tmp_path: Path, built: dict[str, tuple[Path, Path]]) -> None:
    one_head = tmp_path / "one-head"
    shutil.copytree(built["onnxruntime"][0], one_head)
    (one_head / "colbert_linear.pt").unlink()
    with pytest.raises(ModelError, match="colbert_linear.pt is missing"):
        read_model_spec(one_head)
    mean = make_checkpoint(tmp_path / "mean", "xlm-roberta", "embed", pooling="mean", bge_m3=True)
    with pytest.raises(ModelError, match="pools CLS"):
        read_model_spec(mean)
    wrong = tmp_path / "wrong-width"
    shutil.copytree(built["onnxruntime"][0], wrong)
    torch.save(torch.nn.Linear(7, 1).state_dict(), wrong / "sparse_linear.pt")
    with pytest.raises(ModelError, match=r"sparse_linear.pt: needs a Linear's `weight` of shape \[out, 32\]"):
        read_model_spec(wrong)


def test_gpu_targets_plan_it(built: dict[str, tuple[Path, Path]]) -> None:
    spec = read_model_spec(built["onnxruntime"][0])
    for target in ("tensorrt", "torch"):
        plan = fp8_plan_away_from_gpu(spec, target)
        assert plan.precision == "fp8" and len(plan.quantized_layers) >= 8, plan.quantized_layers
        assert not any("sparse_linear" in name or "colbert_linear" in name for name in plan.quantized_layers)
