"""FP8 / NVFP4 post-training quantization with ModelOpt, simulated on the CPU: accuracy figure and gate,
the Q/DQ ONNX graph for TensorRT, and the calibration texts (bei/quantization/modelopt.py, bei/quantization/calibration.py).

ModelOpt comes with the `quant` extra; without it this module is skipped.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("modelopt")

from bei import accuracy  # noqa: E402
from bei.backend import Batch  # noqa: E402
from bei.errors import CheckpointError, ConfigError, ExportError  # noqa: E402
from bei.modeling.detect import read_model_spec  # noqa: E402
from bei.modeling.module import build_module, input_names  # noqa: E402
from bei.modeling.quant_layers import quantized_layer_names  # noqa: E402
from bei.quantization import calibration, qdq  # noqa: E402
from bei.quantization import modelopt as Q  # noqa: E402
from bei.quantization.builtin_texts import builtin_texts, heldout_texts  # noqa: E402
from bei.quantization.calibration import load_calibration_texts  # noqa: E402
from bei.text.tokenizer import TokenizerRuntime  # noqa: E402

MAX_LEN = 48
CALIB = builtin_texts(64)


class Tiny:
    def __init__(self, folder: Path) -> None:
        self.spec = read_model_spec(folder)
        self.tokenizer = TokenizerRuntime(folder / "tokenizer.json", self.spec.max_seq_len)
        self.reference = build_module(self.spec)
        self.heldout: Batch = calibration.heldout_batch(self.spec, self.tokenizer, CALIB, MAX_LEN, n=24)
        self.sample: Batch = calibration.make_batches(self.spec, self.tokenizer, ["Hello world.", "A", CALIB[4]], MAX_LEN)[0]

    def quantize(self, qtype: str) -> Any:
        return Q.quantize_module(self.reference, self.tokenizer, qtype, CALIB, MAX_LEN)  # a quantized copy

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        return batch.feeds(input_names(self.spec))

    def torch_out(self, module: torch.nn.Module, batch: Batch) -> np.ndarray:
        with torch.no_grad():
            return module(**{k: torch.from_numpy(v) for k, v in self.feeds(batch).items()}).numpy()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory: Callable[..., Path]) -> Tiny:
    return Tiny(tiny_checkpoint_factory("bert", "embed"))


@pytest.fixture(scope="module")
def fp8(tiny: Tiny) -> Any:
    return tiny.quantize("fp8")


@pytest.fixture(scope="module")
def fp8_graph(tiny: Tiny, fp8: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("fp8") / "model.onnx"
    return path, qdq.export_qdq_onnx(fp8, tiny.sample, path)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --- FP8 --------------------------------------------------------------------------------------
def test_fp8_accuracy_is_high_but_quantization_happened(tiny: Tiny, fp8: Any) -> None:
    acc = Q.measure_accuracy(tiny.reference, fp8, tiny.heldout, tiny.spec.task)
    assert acc.qtype == "fp8" and acc.samples == 24 and acc.top1_agreement is None
    assert 0.9 < acc.min_cosine <= acc.mean_cosine < 1 - 1e-6, acc
    assert acc.max_abs_diff > 1e-4, acc
    assert acc.as_dict()["metric"] == "row cosine" and json.dumps(acc.as_dict())
    # every encoder Linear (2 layers x q, k, v, attention out, intermediate, output); heads and the
    # reference module untouched
    layers = Q.quantized_layers(fp8)
    linears = {n: m.in_features for n, m in tiny.reference.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized_layer_names(linears, "fp8") == layers
    assert len(layers) == 12 and not any("pooler" in name for name in layers), layers
    assert Q.quantized_layers(tiny.reference) == []


def test_accuracy_gate(tiny: Tiny, fp8: Any) -> None:
    acc = Q.measure_accuracy(tiny.reference, fp8, tiny.heldout, tiny.spec.task)
    accuracy.require_accuracy(acc, 0.9)
    with pytest.raises(ExportError) as err:
        accuracy.require_accuracy(acc, 0.99999999)
    message = str(err.value)
    assert message.startswith(f"fp8 quantization keeps cosine {acc.min_cosine:.4f} < 0.99999999 required"), message
    assert "24 held-out inputs" in message and "calib_dataset" in message


def test_fp8_qdq_onnx_has_fp8_quantize_dequantize(tiny: Tiny, fp8: Any, fp8_graph: tuple[Path, dict[str, int]]) -> None:
    path, counts = fp8_graph
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"], counts
    assert counts["fp8_weights"] == 12 and counts["layers"] == 12 and counts["fp4_weights"] == 0, counts
    assert qdq.qdq_layers(path) == Q.quantized_layers(fp8)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert not any(n.domain == qdq.QDOMAIN for n in model.graph.node)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":  # activations: the zero point makes the output FP8 E4M3
            assert types[node.input[2]] == onnx.TensorProto.FLOAT8E4M3FN
        if node.op_type == "DequantizeLinear" and node.input[0] in types:  # weights stored in FP8
            assert types[node.input[0]] == onnx.TensorProto.FLOAT8E4M3FN
    onnx.checker.check_model(model)

    # ONNX Runtime runs the FP8 Q/DQ graph on the CPU: it computes what the fake-quantized module does
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, tiny.feeds(tiny.heldout))[0]
    assert _cosines(got, tiny.torch_out(fp8, tiny.heldout)).min() > 0.99999
    assert np.abs(got - tiny.torch_out(tiny.reference, tiny.heldout)).max() > 1e-4


@pytest.mark.parametrize("task", ["rerank", "classify"])
def test_accuracy_of_scores_is_their_correlation(task: str, tiny_checkpoint_factory: Callable[..., Path]) -> None:
    model = Tiny(tiny_checkpoint_factory("bert", task))
    same = Q.measure_accuracy(model.reference, copy.deepcopy(model.reference), model.heldout, task)
    assert same.metric == "score correlation" and same.top1_agreement == 1.0
    assert same.min_cosine == pytest.approx(1.0) and same.max_abs_diff == 0.0
    noisy = copy.deepcopy(model.reference)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
    acc = Q.measure_accuracy(model.reference, noisy, model.heldout, task)
    assert len(acc.cosines) == (1 if task == "rerank" else 2)  # one correlation per score
    assert 0.0 < acc.min_cosine < 1.0 and 0.0 < acc.top1_agreement <= 1.0 and acc.max_abs_diff > 0  # type: ignore[operator]


# --- NVFP4 ------------------------------------------------------------------------------------
def test_fp4_mlp_only_quantizes_fewer_layers_than_fp4(tiny: Tiny) -> None:
    fp4, mlp = tiny.quantize("fp4"), tiny.quantize("fp4_mlp_only")
    all_layers, mlp_layers = Q.quantized_layers(fp4), Q.quantized_layers(mlp)
    assert len(all_layers) == 12
    assert set(mlp_layers) < set(all_layers) and len(mlp_layers) == 4, mlp_layers
    assert not any("attention" in name for name in mlp_layers)
    linears = {n: m.in_features for n, m in tiny.reference.named_modules() if isinstance(m, torch.nn.Linear)}
    # the dry-run plan and the torch target select layers with the rule ModelOpt was configured with
    assert quantized_layer_names(linears, "fp4") == all_layers
    assert quantized_layer_names(linears, "fp4_mlp_only") == mlp_layers
    for module in (fp4, mlp):  # NVFP4 simulated on the CPU: outputs change, stay finite and close
        acc = Q.measure_accuracy(tiny.reference, module, tiny.heldout, tiny.spec.task)
        assert 0.5 < acc.min_cosine < 1 - 1e-6, acc


def test_nvfp4_cpu_kernel_matches_modelopt_nvfp4_tensor() -> None:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.rand(48, 1) * 3
    amax = w.abs().max()
    s2 = amax / (6.0 * 448.0)
    qt, scale, _ = NVFP4QTensor.quantize(w.clone(), 16, weights_scaling_factor_2=s2)
    expected = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=s2, block_sizes={-1: 16})
    got = Q.nvfp4_fake_quant(w, amax, 16)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, w, atol=1e-3)


def test_fp4_qdq_onnx_is_modelopt_nvfp4_layout(tiny: Tiny, tmp_path: Path) -> None:
    mlp = tiny.quantize("fp4_mlp_only")
    path = tmp_path / "model.onnx"
    counts = qdq.export_qdq_onnx(mlp, tiny.sample, path)
    assert counts["TRT_FP4DynamicQuantize"] == 4 and counts["fp4_weights"] == 4 and counts["layers"] == 4, counts
    assert counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 4 * 2 * 2  # 2 DQ per weight / input
    model = onnx.load(str(path))
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 23 and "trt" in opsets
    types = Counter(t.data_type for t in model.graph.initializer)
    assert types[onnx.TensorProto.FLOAT4E2M1] == 4 and types[onnx.TensorProto.FLOAT8E4M3FN] == 4

    # the graph computes the simulated module: evaluate it with ONNX's reference evaluator, the TensorRT
    # dynamic FP4 quantize written in numpy (ONNX Runtime has no such op)
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 - the op's name
        op_domain = "trt"

        def _run(self, x, s2, axis=-1, block_size=16, scale_type=17):  # type: ignore[no-untyped-def]
            blocks = x.reshape(*x.shape[:-1], -1, block_size).astype(np.float32)
            scale_f8 = np.minimum(np.abs(blocks).max(-1, keepdims=True) / (6.0 * s2), 448.0).astype(ml_dtypes.float8_e4m3fn)
            scale = scale_f8.astype(np.float32) * s2
            q = (blocks / np.where(scale > 0, scale, 1.0)).astype(ml_dtypes.float4_e2m1fn)
            return q.reshape(x.shape), scale_f8[..., 0]

    evaluator = ReferenceEvaluator(str(path), new_ops=[TRT_FP4DynamicQuantize])
    got = evaluator.run(None, tiny.feeds(tiny.heldout))[0]
    assert _cosines(got, tiny.torch_out(mlp, tiny.heldout)).min() > 0.99999


def test_errors_without_quantization(tiny: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no enabled quantizer"):
        qdq.export_qdq_onnx(tiny.reference, tiny.sample, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="int8"):
        Q.quant_config("int8")


# --- calibration texts ------------------------------------------------------------------------
def test_calibration_txt_jsonl_json(tmp_path: Path) -> None:
    (tmp_path / "calib.txt").write_text("first line\n\n  second line  \nthird\n", encoding="utf-8")
    assert load_calibration_texts("calib.txt", 10, tmp_path) == ["first line", "second line", "third"]
    assert load_calibration_texts(str(tmp_path / "calib.txt"), 2, None) == ["first line", "second line"]

    records = [{"id": 1, "text": "a text"}, {"id": 2, "body": "first string field"}, {"text": ""}, {"n": 3}]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    assert load_calibration_texts("calib.jsonl", 10, tmp_path) == ["a text", "first string field"]

    (tmp_path / "calib.json").write_text(json.dumps(["x y", "café ☕", "z"]), encoding="utf-8")
    assert load_calibration_texts("calib.json", 2, tmp_path) == ["x y", "café ☕"]

    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json must hold a JSON list"):
        load_calibration_texts("bad.json", 2, tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no non-empty text"):
        load_calibration_texts("empty.txt", 2, tmp_path)


def test_calibration_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_calibration_texts("data/missing.jsonl", 10, tmp_path)
    assert "calib_dataset" in str(err.value) and str(tmp_path / "data" / "missing.jsonl") in str(err.value)


def test_calibration_builtin_sample() -> None:
    texts = load_calibration_texts(None, 300, None)
    assert len(texts) == 300 == len(set(texts)) and texts == builtin_texts(300)
    assert load_calibration_texts(None, 10, None) == texts[:10]
    assert len({t.split()[0] for t in texts}) > 30 and max(len(t) for t in texts) > 4 * min(len(t) for t in texts)
    assert not set(heldout_texts(32, texts)) & set(texts)


def test_calibration_hf_dataset_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and HF dataset acme/calib is not in the cache"):
        load_calibration_texts("acme/calib", 10, None)
    repo = tmp_path / "datasets--acme--calib"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    data = repo / "snapshots" / "0123abc" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "cached one"}\n{"text": "cached two"}\n', encoding="utf-8")
    assert load_calibration_texts("acme/calib", 10, None) == ["cached one", "cached two"]
