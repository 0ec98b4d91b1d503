"""jina-embeddings-v3 as jinaai publishes it: `model_type: xlm-roberta` with an `auto_map` into
jinaai/xlm-roberta-flash-implementation, rotary positions, and a task LoRA adapter per task on every
Linear and Embedding (torch parametrize's weight names). bei builds it with its own implementation,
the adapter of `trt_llm.build.adapter` merged into the weights and the task's instruction as the
default prompt, on both CPU targets; the checkpoint's code is never run (it cannot even be downloaded here).

Reference: transformers' native JinaEmbeddingsV3Model on the same base weights (a native tiny
checkpoint made with the same seed), with the LoRA delta of the published math (modeling_lora.py's
LoRAParametrization: a Linear's W + alpha / rank * B[t] @ A[t], an Embedding's W + alpha / rank *
A[t] @ B[t]) added by hand to its modules; the texts get the task's instruction, mean pooling, normalize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bei.config import parse_config
from bei.errors import ModelError
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.modeling.lora import merge_adapter
from bei.testing.inproc_server import config_for, make_and_build, serve_engine
from bei.testing.tiny_models import TEXTS, edit_config, make_checkpoint
from tests.compat import ok
from tests.servers import assert_fp32_parity, fp8_plan_away_from_gpu, run_bei

TARGETS = ("onnxruntime", "torch")
EMBEDDER: dict[str, Any] = {"pooling": "mean", "normalize": True, "max_seq_length": 128}  # room for the instruction
ADAPTERS = ("retrieval.query", "text-matching")
ROOT = Path(__file__).resolve().parents[1]  # one task with an instruction, one without


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same base weights (seed 0) in transformers' native format, without adapters: the reference's."""
    return make_checkpoint(tmp_path_factory.mktemp("jina-native") / "native", "jina_embeddings_v3", "embed", **EMBEDDER)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[tuple[str, str], tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("jina-v3")
    out = {}
    for adapter in ADAPTERS:
        for target in TARGETS:
            kwargs = {**EMBEDDER, "jina_lora": True}
            checkpoint, engine, _ = make_and_build(
                str(root), f"{adapter}-{target}", "jina_embeddings_v3", "embed", kwargs, {"target": target, "adapter": adapter}
            )
            out[(adapter, target)] = (Path(checkpoint), Path(engine))
    return out


def reference(native: Path, public: Path, adapter: str | None) -> np.ndarray:
    """Normalized mean-pooled embeddings of TEXTS (with the task's instruction) by transformers' native
    model, `adapter`'s LoRA delta (the published math) added by hand; None: the base weights."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(native)).eval()
    config = json.loads((public / "config.json").read_text())
    prefix = ""
    if adapter is not None:
        state = load_file(str(public / "model.safetensors"))
        task, scale = config["lora_adaptations"].index(adapter), config["lora_alpha"] / config["lora_rank"]

        def delta(layer: str) -> torch.Tensor:
            a, b = (state[f"roberta.{layer}.parametrizations.weight.0.lora_{x}"][task] for x in "AB")
            return scale * (a @ b if "embeddings" in layer else b @ a)

        hidden = model.config.hidden_size
        with torch.no_grad():
            model.embeddings.word_embeddings.weight += delta("embeddings.word_embeddings")
            model.embeddings.token_type_embeddings.weight += delta("embeddings.token_type_embeddings")
            for i, layer in enumerate(model.layers):
                qkv = delta(f"encoder.layers.{i}.mixer.Wqkv")
                for n, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
                    proj.weight += qkv[n * hidden : (n + 1) * hidden]
                layer.self_attn.o_proj.weight += delta(f"encoder.layers.{i}.mixer.out_proj")
                layer.mlp.fc1.weight += delta(f"encoder.layers.{i}.mlp.fc1")
                layer.mlp.fc2.weight += delta(f"encoder.layers.{i}.mlp.fc2")
        prefix = config["task_instructions"][adapter]
    tokenizer = AutoTokenizer.from_pretrained(str(native))
    batch = tokenizer([prefix + text for text in TEXTS], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden_states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden_states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_chosen_adapter_and_its_instruction_equal_the_published_math(
    adapter: str, target: str, built: dict[tuple[str, str], tuple[Path, Path]], native: Path
) -> None:
    checkpoint, engine = built[(adapter, target)]
    want = reference(native, checkpoint, adapter)
    with serve_engine(engine) as base_url, httpx.Client(base_url=base_url, timeout=60.0) as client:
        got = [row["embedding"] for row in ok(client.post("/v1/embeddings", json={"input": TEXTS, "model": "m"}))["data"]]
        assert_fp32_parity(got, want, f"{adapter} /v1/embeddings")
        named = ok(client.post("/embed", json={"inputs": TEXTS, "prompt_name": adapter}))
        assert_fp32_parity(named, want, f"{adapter} /embed prompt_name")
        # another task's instruction on this task's merged weights would be silently wrong: refused
        other = next(task for task in ADAPTERS if task != adapter)
        refused = client.post("/embed", json={"inputs": TEXTS, "prompt_name": other})
        assert refused.status_code == 422 and other in refused.text, refused.text
    # the adapter is no no-op on these weights (retrieval.query's instruction is in `want` too)
    assert float(np.min((reference(native, checkpoint, None) * want).sum(1))) < 0.999


def test_detection(built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    checkpoint = built[("retrieval.query", "onnxruntime")][0]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta" and "auto_map" in config
    spec = read_model_spec(checkpoint, adapter="retrieval.query")
    assert (spec.model_type, spec.task, spec.base_model, spec.adapter) == (
        "jina_embeddings_v3",
        Task.EMBED,
        "encoder_bert",
        "retrieval.query",
    )
    assert spec.default_prompt_name == "retrieval.query"
    assert spec.prompts["retrieval.query"] == "Represent the query for retrieving evidence documents: "
    assert set(spec.prompts) == {"retrieval.query"}  # the other tasks' instructions are not offered


def test_a_missing_or_unknown_adapter_is_refused_naming_the_field(built: dict[tuple[str, str], tuple[Path, Path]], native: Path) -> None:
    checkpoint = built[("retrieval.query", "onnxruntime")][0]
    with pytest.raises(ModelError, match=r"trt_llm\.build\.adapter is required: .* retrieval\.query, retrieval\.passage, separation"):
        read_model_spec(checkpoint)
    with pytest.raises(ModelError, match=r"trt_llm\.build\.adapter: 'retrieval' is not one of .*text-matching"):
        read_model_spec(checkpoint, adapter="retrieval")
    with pytest.raises(ModelError, match=r"trt_llm\.build\.adapter: 'separation' chosen, but .* has no task LoRA adapters"):
        read_model_spec(native, adapter="separation")
    config = parse_config(config_for("jina", checkpoint, "encoder_bert", adapter="classification"))
    assert config.trt_llm.build.adapter == "classification"


def test_other_custom_code_stays_refused(built: dict[tuple[str, str], tuple[Path, Path]], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(built[("retrieval.query", "onnxruntime")][0], tmp_path / "other"))
    edit_config(folder, {"auto_map": {"AutoModel": "someone/xlm-roberta-custom--modeling.CustomModel"}})
    with pytest.raises(ModelError, match=r"auto_map names custom code .*CustomModel.*jina-embeddings-v3"):
        read_model_spec(folder, adapter="retrieval.query")
    edit_config(folder, {"auto_map": {"AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"},
                         "window_size": [8, 8]})  # fmt: skip
    with pytest.raises(ModelError, match=r"window_size=\[8, 8\] is not supported for jina-embeddings-v3"):
        read_model_spec(folder, adapter="retrieval.query")


def test_gpu_targets_plan_it(built: dict[tuple[str, str], tuple[Path, Path]]) -> None:
    spec = read_model_spec(built[("retrieval.query", "onnxruntime")][0], adapter="retrieval.query")
    for target in ("tensorrt", "torch"):
        plan = fp8_plan_away_from_gpu(spec, target)
        assert plan.precision == "fp8" and plan.parameters > 0 and len(plan.quantized_layers) >= 8, plan.quantized_layers


def test_tensorrt_dry_run_with_the_adapter_field(built: dict[tuple[str, str], tuple[Path, Path]], tmp_path: Path) -> None:
    checkpoint = built[("retrieval.query", "onnxruntime")][0]
    config, engines = tmp_path / "config.yaml", tmp_path / "engines"
    args = ("build", config, "--dry-run", "--target", "tensorrt", "--json", "--engines-dir", engines)
    config.write_text(yaml.safe_dump(config_for("jina", checkpoint, "encoder_bert", adapter="retrieval.passage")))
    result = run_bei(*args)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["target"] == "tensorrt" and plan["precision"] == "fp16" and plan["profiles"]
    assert not engines.exists() or list(engines.iterdir()) == []
    config.write_text(yaml.safe_dump(config_for("jina", checkpoint, "encoder_bert")))
    result = run_bei(*args)
    assert result.returncode != 0 and "trt_llm.build.adapter is required" in result.stderr, result.stderr


def test_merge_picks_the_task_and_keeps_bf16_weights_exact() -> None:
    config = {"lora_adaptations": ["a", "b"], "lora_rank": 1, "lora_alpha": 2.0}
    w, e = torch.randn(3, 4).to(torch.bfloat16), torch.randn(5, 4)
    a, b = torch.randn(2, 1, 4), torch.randn(2, 3, 1)  # Linear [out 3, in 4]
    ea, eb = torch.randn(2, 5, 1), torch.randn(2, 1, 4)  # Embedding [vocab 5, dim 4]
    lin, emb = "layer.parametrizations.weight.", "embeddings.word_embeddings.parametrizations.weight."
    state = {lin + "original": w, lin + "0.lora_A": a, lin + "0.lora_B": b, "layer.bias": torch.zeros(3)}
    state |= {emb + "original": e, emb + "0.lora_A": ea, emb + "0.lora_B": eb}
    merged = merge_adapter(state, config, "b")
    assert sorted(merged) == ["embeddings.word_embeddings.weight", "layer.bias", "layer.weight"]
    assert merged["layer.weight"].dtype == torch.float32
    torch.testing.assert_close(merged["layer.weight"], w.float() + 2.0 * b[1] @ a[1])
    torch.testing.assert_close(merged["embeddings.word_embeddings.weight"], e + 2.0 * ea[1] @ eb[1])
    del state[lin + "0.lora_B"]
    with pytest.raises(ModelError, match="layer: its weight is parametrized but lora_A / lora_B are missing"):
        merge_adapter(state, config, "a")
