"""The CPU target's offline fusions (bei/targets/onnxruntime/fusions.py): fused ops in the graph, the same numbers
as the exported graph and transformers, and a fallback when a fusion does not agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from bei.accuracy import compare
from bei.backend import Batch
from bei.buildsteps.samples import reference_outputs, sample_batch
from bei.modeling.detect import read_model_spec
from bei.modeling.module import build_module
from bei.modeling.onnx_export import export_onnx
from bei.modeling.spec import ModelSpec
from bei.targets.loading import load_engine
from bei.targets.onnxruntime import fusions as ort_target
from bei.testing.inproc_server import base_model_for
from bei.text.tokenizer import TokenizerRuntime
from tests.servers import BuiltEngine, cosine

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog near the river bank.", "A", "Engines are built once."]


def op_counts(graph: Path) -> dict[str, int]:
    model = onnx.load(str(graph), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_minilm_engine_runs_fused_attention(minilm_build: BuiltEngine, st_model: Any) -> None:
    counts = op_counts(minilm_build.engine_dir / "model.onnx")
    # one Attention per layer replaces the Q/K/V MatMuls, the head Transposes and the Softmax
    assert counts.get("Attention") == 6, counts
    assert counts.get("SkipLayerNormalization") == 12 and counts.get("BiasGelu") == 6, counts
    assert "Softmax" not in counts and "Transpose" not in counts, counts
    assert "fused: Attention x6" in minilm_build.stderr

    engine = load_engine(minilm_build.engine_dir)
    batch = Batch.pad([engine.tokenizer.encode(t, truncate=True) for t in TEXTS], engine.tokenizer.pad_id)
    vectors = engine.backend.infer(batch)
    expected = st_model.encode(TEXTS, convert_to_numpy=True)
    for got, want in zip(vectors, expected, strict=False):
        assert cosine(got, want) >= 0.99999


# --- tiny checkpoints: every fusion family ------------------------------------------------------
class Exported:
    def __init__(self, spec: ModelSpec, graph: Path, batch: Batch, reference: np.ndarray) -> None:
        self.spec, self.graph, self.batch, self.reference = spec, graph, batch, reference


@pytest.fixture(scope="module")
def export_tiny(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> Callable[[str, str], Exported]:
    made: dict[tuple[str, str], Exported] = {}

    def export(model_type: str, task: str) -> Exported:
        if (model_type, task) not in made:
            kwargs = {"pooling": "lasttoken" if base_model_for(model_type) == "encoder" else "mean"} if task == "embed" else {}
            checkpoint = tiny_checkpoint_factory(model_type, task, **kwargs)
            spec = read_model_spec(checkpoint, base_model=base_model_for(model_type))
            tokenizer = TokenizerRuntime(checkpoint / "tokenizer.json", spec.max_seq_len, chat_template=spec.chat_template)
            module = build_module(spec)
            batch = sample_batch(spec, tokenizer)
            reference = reference_outputs(module, batch)
            graph = tmp_path_factory.mktemp(f"{model_type}-{task}-export") / "exported.onnx"
            export_onnx(module, batch, graph)
            made[(model_type, task)] = Exported(spec, graph, batch, reference)
        return made[(model_type, task)]

    return export


@pytest.mark.parametrize(
    ("model_type", "task", "fused"),
    [
        ("bert", "embed", {"Attention", "SkipLayerNormalization", "BiasGelu"}),
        ("distilbert", "rerank", {"Attention", "SkipLayerNormalization"}),
        ("llama", "embed", {"MultiHeadAttention", "SkipSimplifiedLayerNormalization"}),
        ("modernbert", "ner", {"MultiHeadAttention"}),
    ],
)
def test_fused_graph_agrees_with_transformers(
    export_tiny: Callable[[str, str], Exported], tmp_path: Path, model_type: str, task: str, fused: set[str]
) -> None:
    exported = export_tiny(model_type, task)
    notes: list[str] = []
    counts = ort_target.optimize(exported.spec, exported.graph, tmp_path / "model.onnx", note=notes.append)
    assert notes == []
    assert fused <= set(counts), counts
    assert counts == {k: v for k, v in op_counts(tmp_path / "model.onnx").items() if k in ort_target.FUSED_OPS}
    got = ort_target.run_graph(tmp_path / "model.onnx", exported.spec, exported.batch)
    agreement = compare(exported.reference, got)
    assert agreement.min_cosine >= 0.99999 and agreement.max_abs_diff <= 1e-4, agreement


# --- a fusion that does not agree, or fails, is not used -----------------------------------------
def _perturbed(spec: ModelSpec, source: Path, target: Path) -> None:
    """A 'fusion' that changes the numbers: the largest weight matrix times 1.5."""
    model = onnx.load(str(source))
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(largest) * np.float32(1.5)
    largest.CopyFrom(onnx.numpy_helper.from_array(array, largest.name))
    onnx.save_model(model, str(target))


def _failing(spec: ModelSpec, source: Path, target: Path) -> None:
    raise RuntimeError("pattern matcher gave up")


def test_disagreeing_and_failing_fusions_fall_back_to_the_exported_graph(
    export_tiny: Callable[[str, str], Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exported = export_tiny("bert", "embed")
    broken = [ort_target.Candidate("perturbed", _perturbed), ort_target.Candidate("failing", _failing)]
    monkeypatch.setattr(ort_target, "candidates", lambda spec: broken)
    notes: list[str] = []
    counts = ort_target.optimize(exported.spec, exported.graph, tmp_path / "model.onnx", note=notes.append)
    assert counts == {}
    assert len(notes) == 2
    assert notes[0].startswith("perturbed not used: its graph differs from the exported one (cosine")
    assert notes[1] == "failing skipped: RuntimeError: pattern matcher gave up"
    # the exported graph, unchanged: same nodes, same numbers
    assert op_counts(tmp_path / "model.onnx") == op_counts(exported.graph)
    got = ort_target.run_graph(tmp_path / "model.onnx", exported.spec, exported.batch)
    assert compare(exported.reference, got).max_abs_diff <= 1e-5


def test_the_first_candidate_that_agrees_is_kept(
    export_tiny: Callable[[str, str], Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exported = export_tiny("bert", "embed")
    chain = [ort_target.Candidate("perturbed", _perturbed), ort_target.Candidate("onnxscript", ort_target.onnxscript_fusions)]
    monkeypatch.setattr(ort_target, "candidates", lambda spec: chain)
    notes: list[str] = []
    counts = ort_target.optimize(exported.spec, exported.graph, tmp_path / "model.onnx", note=notes.append)
    assert counts.get("Attention") == 2
    assert len(notes) == 1 and notes[0].startswith("perturbed not used")


# --- the padding mask as Attention's mask_index -------------------------------------------------
def _attention_inputs(graph: Path) -> list[list[str]]:
    model = onnx.load(str(graph), load_external_data=False)
    return [list(n.input) for n in model.graph.node if n.op_type == "Attention"]


@pytest.mark.parametrize(("model_type", "task"), [("bert", "embed"), ("roberta", "classify"), ("distilbert", "rerank")])
def test_attention_takes_the_padding_mask_as_mask_index(
    export_tiny: Callable[[str, str], Exported], tmp_path: Path, model_type: str, task: str
) -> None:
    """The bias subgraph (Where/And/GatherND over the mask) is gone; every Attention reads the int32
    mask; the padded sample batch still equals transformers."""
    exported = export_tiny(model_type, task)
    ort_target.optimize(exported.spec, exported.graph, tmp_path / "model.onnx", note=pytest.fail)
    attention = _attention_inputs(tmp_path / "model.onnx")
    assert attention and all(len(ins) == 4 and ins[3] == ort_target.MASK_INDEX for ins in attention), attention
    counts = op_counts(tmp_path / "model.onnx")
    assert "Where" not in counts and "GatherND" not in counts, counts
    assert (exported.batch.attention_mask == 0).any()  # padding is exercised
    got = ort_target.run_graph(tmp_path / "model.onnx", exported.spec, exported.batch)
    agreement = compare(exported.reference, got)
    assert agreement.min_cosine >= 0.99999 and agreement.max_abs_diff <= 1e-4, agreement


def test_mask_index_that_disagrees_leaves_the_graph_as_it_was(export_tiny: Callable[[str, str], Exported], tmp_path: Path) -> None:
    exported = export_tiny("bert", "embed")
    graph = tmp_path / "model.onnx"
    ort_target.onnxscript_fusions(exported.spec, exported.graph, graph)
    before = graph.read_bytes()
    probe = ort_target.probe_batch(exported.spec)
    wrong = ort_target.run_graph(graph, exported.spec, probe) + 1.0  # an 'expected' no rewrite can reach
    notes: list[str] = []
    assert ort_target.use_mask_index(exported.spec, graph, wrong, probe, notes.append) == 0
    assert graph.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no staging left behind
    assert len(notes) == 1 and notes[0].startswith("Attention mask_index not used: cosine")
    # and the real expectation takes it
    right = ort_target.run_graph(graph, exported.spec, probe)
    assert ort_target.use_mask_index(exported.spec, graph, right, probe, notes.append) == 2
    assert all(ins[3] == ort_target.MASK_INDEX for ins in _attention_inputs(graph))
