"""MPNet, ELECTRA, DeBERTa-v2, NomicBERT, EuroBERT and GTE beyond the parity matrix: what detection reads from their configs, the
GPU targets' plans (the tensorrt dry run, the torch target's FP8 layers), the packed modules' refusals,
and checkpoints whose `auto_map` names custom code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bei.buildsteps.plan import TargetChoice
from bei.errors import ModelError
from bei.hardware import Host
from bei.kinds import Task
from bei.modeling.detect import read_model_spec
from bei.modeling.module import build_module, input_names
from bei.modeling.packed.model import build_packed_module, make_body, read_config
from bei.modeling.packed.relative import RELATIVE_ENCODERS
from bei.targets.plan import make_plan
from bei.testing.inproc_server import config_for
from bei.testing.tiny_models import edit_config

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = Host(versions={"onnxruntime": "1.32.0"})
ADDED = ("mpnet", "electra", "deberta-v2", "nomic_bert", "eurobert", "gte", "jina_embeddings_v3")


@pytest.mark.parametrize("model_type", ADDED)
def test_detection(model_type: str, tiny_checkpoint_factory: Callable[..., Path]) -> None:
    reranker = read_model_spec(tiny_checkpoint_factory(model_type, "rerank"))
    assert (reranker.base_model, reranker.task, len(reranker.labels)) == ("encoder_bert", Task.RERANK, 1)
    # ELECTRA's pairs carry token types (ms-marco-electra-base), NomicBERT's too; MPNet has none, DeBERTa-v3's type_vocab_size is 0
    assert reranker.uses_token_type_ids is (model_type in ("electra", "nomic_bert"))
    ner = read_model_spec(tiny_checkpoint_factory(model_type, "ner"))
    assert ner.task is Task.NER and len(ner.labels) == 9
    # MPNet counts positions from pad + 1, as RoBERTa: two of its 130 position embeddings are unusable
    assert read_model_spec(tiny_checkpoint_factory(model_type, "embed")).max_seq_len == 64


@pytest.mark.parametrize("model_type", ADDED)
@pytest.mark.parametrize(
    ("target", "quantization", "precision"), [("tensorrt", "fp8", "fp8"), ("torch", "fp8", "fp8"), ("tensorrt", "no_quant", "fp16")]
)
def test_gpu_targets_plan_them(
    model_type: str, target: str, quantization: str, precision: str, tiny_checkpoint_factory: Callable[..., Path]
) -> None:
    spec = read_model_spec(tiny_checkpoint_factory(model_type, "classify"))
    plan = make_plan(
        spec,
        target=TargetChoice(target, "test"),
        base_model="encoder_bert",
        quantization=quantization,
        max_num_tokens=16384,
        max_batch_size=256,
        accelerator="H100",
        host=NO_GPU,
    )
    assert plan.precision == precision and plan.parameters > 0
    if quantization == "fp8":  # 2 layers x (q, k, v or fused qkv, attention out, intermediate, output) at least
        assert len(plan.quantized_layers) >= 8, plan.quantized_layers


def test_tensorrt_dry_run_of_a_deberta_reranker(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for("deberta", tiny_checkpoint_factory("deberta-v2", "rerank"), "encoder_bert")))
    engines = tmp_path / "engines"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bei.cli",
            "build",
            str(config),
            "--dry-run",
            "--target",
            "tensorrt",
            "--json",
            "--engines-dir",
            str(engines),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["target"] == "tensorrt" and plan["precision"] == "fp16" and plan["profiles"]
    assert not engines.exists() or list(engines.iterdir()) == []


def test_packed_modules_refuse_what_they_do_not_implement(tiny_checkpoint_factory: Callable[..., Path]) -> None:
    deberta = read_config(tiny_checkpoint_factory("deberta-v2", "classify"))
    bad = [
        ({**deberta, "conv_kernel_size": 4}, "conv_kernel_size"),
        ({**deberta, "conv_kernel_size": 3, "conv_groups": 5}, "conv_groups"),
        ({**deberta, "conv_kernel_size": 3, "conv_act": "no_such_act"}, "conv_act"),
        ({**deberta, "pos_att_type": ["c2p", "p2p"]}, "pos_att_type"),
        ({**deberta, "pooler_hidden_size": 16}, "pooler_hidden_size"),
        ({**deberta, "hidden_act": "no_such_act"}, "hidden_act"),
    ]
    for config, field_name in bad:
        with pytest.raises(ModelError, match=field_name):
            RELATIVE_ENCODERS["deberta-v2"](config, Task.CLASSIFY, 2)
    for model_type in ADDED:  # no masked-LM head (ELECTRA's is its generator's)
        spec = read_model_spec(tiny_checkpoint_factory(model_type, "embed"))
        with pytest.raises(ModelError, match="sparse"):
            make_body(spec.__class__(**{**spec.__dict__, "task": Task.SPARSE}), read_config(spec.path))


def test_custom_code_is_refused_naming_what_bei_supports(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_checkpoint_factory("bert", "embed"), tmp_path / "jina"))
    # jina-embeddings-v2: model_type bert, ALiBi in its own modeling file
    edit_config(folder, {"auto_map": {"AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"}})
    with pytest.raises(ModelError, match=r"auto_map names custom code .*JinaBertModel.*no remote code.*mpnet, electra, deberta-v2"):
        read_model_spec(folder)
    edit_config(folder, {"auto_map": None, "model_type": "nomic_bert_custom"})
    with pytest.raises(ModelError, match="model_type 'nomic_bert_custom' .* is not supported; supported: bert, .*deberta-v2"):
        read_model_spec(folder)


NATIVE_NOMIC_KEYS = {
    key: None
    for key in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
        "layer_norm_eps", "rope_parameters", "hidden_act", "head_dim",
    )
}  # fmt: skip


def test_nomic_bert_read_in_its_public_spelling(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    """A config.json with only the authors' spelling (n_embd, n_layer, ..., rotary_emb_base), as
    nomic-embed-text-v1.5's: both implementations read its sizes (transformers alone would load
    its defaults), and both equal the checkpoint read in the native spelling."""
    import shutil

    import torch

    from bei.backend import Batch
    from bei.testing.tiny_models import TEXTS
    from bei.text.tokenizer import TokenizerRuntime

    both = tiny_checkpoint_factory("nomic_bert", "embed")
    public = Path(shutil.copytree(both, tmp_path / "public"))
    edit_config(public, NATIVE_NOMIC_KEYS)
    assert "hidden_size" not in json.loads((public / "config.json").read_text())
    spec = read_model_spec(public)
    assert (spec.hidden_size, spec.num_heads, spec.max_seq_len) == (32, 4, 64)
    tokenizer = TokenizerRuntime(public / "tokenizer.json", spec.max_seq_len)
    batch = Batch.pad([tokenizer.encode(t, truncate=True) for t in TEXTS], tokenizer.pad_id, spec.padding_side)
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds(input_names(spec)).items()}
    with torch.no_grad():
        want = build_module(read_model_spec(both))(**feeds)
        for module in (build_module(spec), build_packed_module(spec).forward_padded):
            assert float((module(**feeds) - want).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("edit", "field_name"),
    [({"prenorm": True}, "prenorm"), ({"rotary_scaling_factor": 2.0}, "rotary_scaling_factor"), ({"num_experts": 8}, "num_experts"),
     ({"qkv_proj_bias": True}, "qkv_proj_bias"), ({"activation_function": "gelu"}, "activation_function")],
)  # fmt: skip
def test_nomic_bert_settings_neither_implementation_has_are_refused(
    edit: dict[str, object], field_name: str, tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_checkpoint_factory("nomic_bert", "embed"), tmp_path / "nomic"))
    edit_config(folder, edit)
    with pytest.raises(ModelError, match=field_name):
        read_model_spec(folder)


@pytest.mark.parametrize("model_type", ADDED)
def test_packed_modules_run_with_bf16_and_fp8_linears(model_type: str, tiny_checkpoint_factory: Callable[..., Path]) -> None:
    """The CPU bf16 and FP8 builds replace the body's Linears (DeBERTa projects its relative
    embeddings through the fused q / k / v module, which they replace): outputs stay near fp32."""
    import numpy as np
    import torch

    from bei.backend import Batch
    from bei.modeling.packed.bf16 import to_bf16
    from bei.modeling.packed.fp8 import quantize_fp8
    from bei.testing.tiny_models import TEXTS
    from bei.text.tokenizer import TokenizerRuntime

    spec = read_model_spec(tiny_checkpoint_factory(model_type, "embed"))
    tokenizer = TokenizerRuntime(spec.path / "tokenizer.json", spec.max_seq_len)
    batch = Batch.pad([tokenizer.encode(t, truncate=True) for t in TEXTS], tokenizer.pad_id, spec.padding_side)
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds(input_names(spec)).items()}
    with torch.no_grad():
        want = build_packed_module(spec).forward_padded(**feeds).numpy()
        for convert, min_cosine in ((to_bf16, 0.999), (quantize_fp8, 0.98)):
            module = build_packed_module(spec)
            assert convert(module)
            got = module.forward_padded(**feeds).float().numpy()
            cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cosine.min() >= min_cosine, f"{convert.__name__}: {cosine.min():.5f}"


def test_eurobert_sequence_head_stays_unquantized(tiny_checkpoint_factory: Callable[..., Path]) -> None:
    from bei.modeling.module import linear_layers
    from bei.modeling.packed.fp8 import fp8_layers
    from bei.modeling.packed.model import PackedEngineModule
    from bei.modeling.quant_layers import quantized_layer_names

    spec = read_model_spec(tiny_checkpoint_factory("eurobert", "classify"))
    tensorrt = quantized_layer_names(linear_layers(spec), "fp8")
    torch_target = fp8_layers(PackedEngineModule(spec, make_body(spec, read_config(spec.path)), load_heads=False))
    for names in (tensorrt, torch_target):
        assert names and not any(part in name for name in names for part in ("dense", "classifier")), names


def test_embeddinggemma_detected_and_planned(tiny_checkpoint_factory: Callable[..., Path]) -> None:
    """EmbeddingGemma's layout (bidirectional gemma3_text, bias-free Dense layers) is read as such and planned
    for the GPU targets (its parity with sentence-transformers: tests/test_task_matrix.py's embeddinggemma rows)."""
    from tests.servers import fp8_plan_away_from_gpu

    folder = tiny_checkpoint_factory(
        "gemma3_text", "embed", pooling="mean", dense=[(96, "identity"), (32, "identity")], dense_bias=False, normalize=True
    )
    spec = read_model_spec(folder)
    assert (spec.base_model, spec.task, spec.embedding_dim, spec.normalize) == ("encoder", Task.EMBED, 32, True)
    assert [(d.in_features, d.out_features, d.bias) for d in spec.dense] == [(32, 96, False), (96, 32, False)]
    assert json.loads((folder / "config.json").read_text())["use_bidirectional_attention"] is True
    for target in ("tensorrt", "torch"):
        plan = fp8_plan_away_from_gpu(spec, target)
        assert plan.precision == "fp8" and len(plan.quantized_layers) >= 8
        assert not any(name.startswith("dense.") for name in plan.quantized_layers)
