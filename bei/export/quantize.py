"""Post-training quantization (FP8, NVFP4) with NVIDIA ModelOpt, its accuracy gate, and a Q/DQ ONNX export.

The flow, all of it runnable on the CPU (simulated "fake" quantization):

    reference = build_module(spec)
    quantized = quantize_module(reference, tokenizer, "fp8", calib_texts, max_seq_len)  # a quantized copy
    held_out = heldout_batch(spec, tokenizer, calib_texts, max_seq_len)
    acc = measure_accuracy(reference, quantized, held_out, spec.task)
    require_accuracy(acc, 0.99)                      # ExportError with the figures below the threshold
    export_qdq_onnx(quantized, sample_batch, path)   # explicit Q/DQ graph for TensorRT
    count_qdq(path), qdq_layers(path)                # what the plan shows

Which layers are quantized: the `nn.Linear` layers of the transformer (weights and their input activations,
per-tensor FP8 E4M3, or NVFP4: E2M1 values in blocks of 16 with FP8 block scales and a per-tensor FP32
scale). The task heads (pooler, classifier, score, MLM / SPLADE head, sentence-transformers Dense layers)
and every non-Linear op (embeddings, LayerNorm, softmax, the attention matmuls) stay in high precision.
`fp4_mlp_only` quantizes the feed-forward Linear layers only (attention projections excluded).

ModelOpt's NVFP4 fake quantization runs on CUDA only (a CUDA extension or a Triton kernel); on CPU tensors
`install_cpu_kernels` routes it to `nvfp4_fake_quant`, a torch port of ModelOpt's Triton kernel. FP8 fake
quantization is ModelOpt's own eager torch code on the CPU.

The ONNX graph: ModelOpt exports Q/DQ only through the TorchScript exporter; bei exports with the dynamo
exporter (as `bei.export.onnx`), each enabled quantizer traced as one placeholder node, then lowered to
- FP8:   weights stored as FLOAT8E4M3FN initializers -> DequantizeLinear; activations QuantizeLinear ->
         DequantizeLinear with a FLOAT8E4M3FN zero point (opset 20, standard ONNX; ONNX Runtime runs it too);
- NVFP4: the layout of ModelOpt's NVFP4 ONNX export that TensorRT consumes: weights as FLOAT4E2M1
         initializers with FLOAT8E4M3FN block scales and two DequantizeLinear (the second blocked,
         block_size 16, axis -1); activations `trt::TRT_FP4DynamicQuantize` -> DequantizeLinear (scales)
         -> DequantizeLinear (blocked); opset 23. TensorRT runs this graph; ONNX Runtime cannot (the
         dynamic FP4 quantize is a TensorRT op).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from bei.errors import ExportError
from bei.export.quant_layers import NVFP4_BLOCK, QUANT_TYPES, excluded_patterns
from bei.modeling.module import EngineModule, input_names
from bei.modeling.spec import ModelSpec, Task
from bei.runtime.base import Batch
from bei.runtime.tokenizer import Encoded, TokenizerRuntime

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
E2M1_MAX = 6.0

QDOMAIN = "bei.quant"  # placeholder ops of the traced graph, lowered by `_lower_qdq`
TRT_DOMAIN = "trt"
FP8_OPSET = 20
FP4_OPSET = 23
LAYER_KEY = "bei.quant.layer"  # node metadata: the quantized layer a Q/DQ node belongs to


# --- modelopt -------------------------------------------------------------------------------
def modelopt_available() -> bool:
    try:
        _mtq()
    except ExportError:
        return False
    return True


def _mtq() -> Any:
    """`modelopt.torch.quantization`, imported quietly; ExportError naming the extra when it is missing."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise ExportError(
            f"quantization needs NVIDIA ModelOpt, which cannot be imported ({err}); "
            "install it with `pip install 'bei[quant]'`"
        ) from err
    return mtq


def _tensor_quantizer_cls() -> type[torch.nn.Module]:
    _mtq()
    from modelopt.torch.quantization.nn import TensorQuantizer

    return TensorQuantizer


def _check_qtype(qtype: str) -> str:
    value = getattr(qtype, "value", qtype)
    if value not in QUANT_TYPES:
        raise ExportError(f"quantization type {value!r} is not one of {', '.join(QUANT_TYPES)}")
    return str(value)


def quant_config(qtype: str, module: torch.nn.Module | None = None) -> dict[str, Any]:
    """The ModelOpt config for `qtype`: ModelOpt's FP8 / NVFP4 default quantizer settings, applied to
    `nn.Linear` layers only, heads excluded, attention excluded for fp4_mlp_only; with `module`, NVFP4 is
    also turned off for Linear layers whose input width is not a multiple of the block size."""
    qtype = _check_qtype(qtype)
    mtq = _mtq()
    base = mtq.FP8_DEFAULT_CFG if qtype == "fp8" else mtq.NVFP4_DEFAULT_CFG
    attrs = {e["quantizer_name"]: e["cfg"] for e in base["quant_cfg"] if isinstance(e, dict) and e.get("cfg")}
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for role in ("*weight_quantizer", "*input_quantizer"):
        entries.append({"quantizer_name": role, "parent_class": "nn.Linear", "cfg": copy.deepcopy(attrs[role])})
    disabled = excluded_patterns(qtype)
    if qtype != "fp8" and module is not None:
        disabled += [
            f"{name}.*"
            for name, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear) and layer.in_features % NVFP4_BLOCK
        ]
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in disabled]
    return {"quant_cfg": entries, "algorithm": base.get("algorithm", "max")}


# --- NVFP4 fake quantization on the CPU -----------------------------------------------------
def nvfp4_fake_quant(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = NVFP4_BLOCK) -> torch.Tensor:
    """NVFP4 quantize-dequantize along the last axis, as ModelOpt's Triton kernel `fp4_fake_quant_block`:
    per block of `block_size`, scale = fp8_e4m3(block_amax / 6 / s2) * s2 with s2 = global_amax / (6 * 448),
    values rounded to the nearest E2M1 magnitude {0, .5, 1, 1.5, 2, 3, 4, 6}."""
    shape, dtype = x.shape, x.dtype
    flat = x.reshape(-1, shape[-1]).float()
    width = flat.shape[-1]
    pad = (-width) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.reshape(flat.shape[0], -1, block_size)
    s2 = global_amax.float().to(x.device) / (E2M1_MAX * E4M3_MAX)
    s2 = torch.where(s2 > 0, s2, torch.full_like(s2, 1e-12))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(block_amax / (E2M1_MAX * s2), max=E4M3_MAX).to(torch.float8_e4m3fn).float() * s2
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    a = blocks.abs() / scale
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    out = torch.where(blocks >= 0, q * scale, -q * scale).reshape(flat.shape)[:, :width]
    return out.reshape(shape).to(dtype)


_CPU_KERNELS_INSTALLED = False


def install_cpu_kernels() -> None:
    """Route ModelOpt's NVFP4 dynamic block quantization of CPU tensors to `nvfp4_fake_quant` (CUDA tensors
    keep ModelOpt's kernels). Idempotent."""
    global _CPU_KERNELS_INSTALLED
    if _CPU_KERNELS_INSTALLED:
        return
    _mtq()
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize_op(
        inputs: torch.Tensor,
        block_size: int,
        amax: torch.Tensor | None,
        num_bits: int,
        exponent_bits: int,
        scale_num_bits: int,
        scale_exponent_bits: int,
    ) -> torch.Tensor:
        nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if nvfp4 and amax is not None and not inputs.is_cuda:
            return nvfp4_fake_quant(inputs, amax, block_size)
        return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op
    _CPU_KERNELS_INSTALLED = True


# --- calibration ----------------------------------------------------------------------------
def _cut(enc: Encoded, max_len: int) -> Encoded:
    """At most `max_len` tokens, the last (a closing special token, or a causal model's last token) kept."""
    if len(enc) <= max_len:
        return enc
    keep = list(range(max_len - 1)) + [len(enc) - 1]
    return Encoded(
        ids=[enc.ids[i] for i in keep],
        type_ids=[enc.type_ids[i] for i in keep],
        offsets=[enc.offsets[i] for i in keep],
        special=[enc.special[i] for i in keep],
        prompt_length=min(enc.prompt_length, max_len - 1),
    )


def encode_texts(spec: ModelSpec, tokenizer: TokenizerRuntime, texts: Sequence[str], max_seq_len: int) -> list[Encoded]:
    """Texts as the engine sees them, cut to `max_seq_len` tokens; rerankers get (text, next text) pairs."""
    if not texts:
        raise ExportError("no calibration texts")
    items: list[str | tuple[str, str]] = list(texts)
    if spec.task is Task.RERANK:
        items = [(texts[i], texts[(i + 1) % len(texts)]) for i in range(len(texts))]
    return [_cut(tokenizer.encode(item, truncate=True), max(2, max_seq_len)) for item in items]


def make_batches(
    spec: ModelSpec, tokenizer: TokenizerRuntime, texts: Sequence[str], max_seq_len: int, batch_size: int = 16
) -> list[Batch]:
    """Padded batches of `texts`, sorted by length (less padding: the activation ranges are those of real tokens)."""
    encoded = sorted(encode_texts(spec, tokenizer, texts, max_seq_len), key=len)
    return [
        Batch.pad(encoded[i : i + batch_size], tokenizer.pad_id, spec.padding_side)
        for i in range(0, len(encoded), max(1, batch_size))
    ]


def calibration_inputs(
    qcfg: Any, spec: ModelSpec, tokenizer: TokenizerRuntime, config_dir: Path | None
) -> tuple[list[str], int, Batch]:
    """`quantization_config`'s calibration texts, their length cap, and the held-out batch the
    accuracy gate measures on (never calibration texts)."""
    from bei.export.calibration import load_calibration_texts

    texts = load_calibration_texts(qcfg.calib_dataset, qcfg.calib_size, base_dir=config_dir)
    max_len = min(qcfg.calib_max_seq_length, spec.max_seq_len)
    return texts, max_len, heldout_batch(spec, tokenizer, texts, max_len)


def heldout_batch(
    spec: ModelSpec, tokenizer: TokenizerRuntime, calib_texts: Sequence[str], max_seq_len: int, n: int = 64
) -> Batch:
    """One padded batch of `n` built-in texts that are not calibration texts, for `measure_accuracy`."""
    from bei.export.calibration import heldout_texts

    return make_batches(spec, tokenizer, heldout_texts(n, calib_texts), max_seq_len, batch_size=n)[0]


def _feeds(module: EngineModule, batch: Batch) -> dict[str, torch.Tensor]:
    device = next(module.parameters()).device
    return {k: torch.from_numpy(v).to(device) for k, v in batch.feeds(input_names(module.spec)).items()}


def quantize_module(
    module: EngineModule,
    tokenizer: TokenizerRuntime,
    qtype: str,
    calib_texts: Sequence[str],
    max_seq_len: int,
    batch_size: int = 16,
    *,
    inplace: bool = False,
) -> EngineModule:
    """A quantized copy of `module` (`module` itself with `inplace=True`; the unquantized module is the
    reference of `measure_accuracy`): ModelOpt inserts quantizers (see `quant_config`), then max-calibrates
    their ranges over padded batches of `calib_texts` (each cut to `max_seq_len` tokens). Runs where the
    module's parameters are (CPU, or CUDA where ModelOpt's own kernels run)."""
    qtype = _check_qtype(qtype)
    mtq = _mtq()
    install_cpu_kernels()
    batches = make_batches(module.spec, tokenizer, calib_texts, max_seq_len, batch_size)
    if not inplace:
        module = copy.deepcopy(module)
    module.eval()

    def forward_loop(model: torch.nn.Module) -> None:
        for batch in batches:
            model(**_feeds(module, batch))

    out = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            mtq.quantize(module, quant_config(qtype, module), forward_loop)
    except Exception as err:  # noqa: BLE001 - modelopt raises many kinds
        raise ExportError(f"{qtype} quantization of {module.spec.architecture} failed: "
                          f"{type(err).__name__}: {err}\n{out.getvalue()[-2000:]}") from err
    layers = quantized_layers(module)
    if not layers:
        raise ExportError(f"{qtype} quantization of {module.spec.architecture} quantized no layer")
    module.bei_quantization = qtype  # type: ignore[assignment]
    log.info("%s: quantized %d layers with %d calibration texts", qtype, len(layers), len(calib_texts))
    return module


def _enabled_quantizers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    cls = _tensor_quantizer_cls()
    for name, sub in module.named_modules():
        if isinstance(sub, cls) and sub.is_enabled:
            yield name, sub


def quantized_layers(module: torch.nn.Module) -> list[str]:
    """Names of the layers whose weights are quantized."""
    return sorted(
        name.rsplit(".", 1)[0] for name, _ in _enabled_quantizers(module) if name.endswith(".weight_quantizer")
    )


# --- accuracy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accuracy:
    """How close the quantized module's outputs are to the reference's on held-out inputs.

    `metric` says what the cosines are:
    - "row cosine" (embed, sparse): the cosine of each input's output vector with the reference's;
    - "score correlation" (rerank, classify, NER): for each output score (label), the Pearson correlation
      (the cosine of the centred values) of that score with the reference's over the held-out inputs (NER:
      over their real tokens). A reranker has one score per input and a classifier a few: the cosine of
      such short rows says nothing (two logits near zero can point anywhere), how each score tracks the
      reference across inputs does.
    `top1_agreement`: share of equal argmax labels (classify, NER) or of equally ordered pairs of scores
    (rerank); None for embedders."""

    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    samples: int
    top1_agreement: float | None = None
    qtype: str | None = None
    metric: str = "row cosine"
    cosines: tuple[float, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The figures, for the manifest (JSON-ready; per-row cosines left out)."""
        return {
            "min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine, "max_abs_diff": self.max_abs_diff,
            "samples": self.samples, "top1_agreement": self.top1_agreement, "metric": self.metric,
        }

    def summary(self) -> str:
        parts = [f"min cosine {self.min_cosine:.4f} ({self.metric})", f"mean cosine {self.mean_cosine:.4f}",
                 f"max abs diff {self.max_abs_diff:.3g}"]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.1%}")
        return ", ".join(parts) + f" on {self.samples} held-out inputs"


def _run(module: EngineModule, batch: Batch) -> np.ndarray:
    with torch.no_grad():
        return module(**_feeds(module, batch)).float().cpu().numpy().astype(np.float64)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    return np.where(na * nb > 0, dots / np.maximum(na * nb, 1e-300), np.where((na == 0) & (nb == 0), 1.0, 0.0))


def _score_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column: Pearson correlation over the rows (plain cosine where a column does not vary)."""
    out = []
    for j in range(a.shape[1]):
        x, y = a[:, j], b[:, j]
        if len(x) > 1 and x.std() > 0 and y.std() > 0:
            out.append(float(np.corrcoef(x, y)[0, 1]))
        else:
            out.append(float(_row_cosines(x[None, :], y[None, :])[0]))
    return np.array(out)


def _pair_order_agreement(a: np.ndarray, b: np.ndarray) -> float:
    i, j = np.triu_indices(len(a), k=1)
    if not len(i):
        return 1.0
    return float(np.mean(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])))


def measure_accuracy(reference: EngineModule, quantized: EngineModule, batch: Batch, task: Task | str) -> Accuracy:
    """Compare `quantized` with `reference` on `batch` (held-out inputs, not the calibration texts)."""
    return accuracy_of_outputs(
        _run(reference, batch), _run(quantized, batch), batch, task, qtype=getattr(quantized, "bei_quantization", None)
    )


def accuracy_of_outputs(
    reference: np.ndarray, output: np.ndarray, batch: Batch, task: Task | str, qtype: str | None = None
) -> Accuracy:
    """`measure_accuracy` for outputs already computed on `batch` (e.g. a TensorRT engine's vs the reference's)."""
    task = Task(task)
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(output, dtype=np.float64)
    if ref.shape != got.shape:
        raise ExportError(f"quantized output shape {got.shape} differs from the reference's {ref.shape}")
    if not np.isfinite(got).all():
        raise ExportError("quantized output has NaN or infinite values")
    if task is Task.NER:  # real tokens only
        ref = np.concatenate([batch.row_tokens(ref, r) for r in range(ref.shape[0])])
        got = np.concatenate([batch.row_tokens(got, r) for r in range(got.shape[0])])
    ref, got = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    top1: float | None = None
    metric = "row cosine"
    if task in (Task.RERANK, Task.CLASSIFY, Task.NER):
        metric = "score correlation"
        cosines = _score_correlations(ref, got)
        if ref.shape[1] == 1:
            top1 = _pair_order_agreement(ref[:, 0], got[:, 0])
        else:
            top1 = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
    else:
        cosines = _row_cosines(ref, got)
    return Accuracy(
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        max_abs_diff=float(np.abs(ref - got).max()),
        samples=int(batch.input_ids.shape[0]),
        top1_agreement=top1,
        qtype=qtype,
        metric=metric,
        cosines=tuple(float(c) for c in cosines),
    )


def require_accuracy(acc: Accuracy, threshold: float = 0.99, *, min_top1: float | None = None) -> None:
    """ExportError unless the worst cosine reaches `threshold` (and top-1 agreement `min_top1`, if given)."""
    what = f"{acc.qtype} quantization" if acc.qtype else "quantization"
    milder = {"fp4": "fp4_mlp_only, fp8 or no_quant", "fp4_mlp_only": "fp8 or no_quant"}.get(acc.qtype or "", "no_quant")
    hint = ("calibrate with texts like the production inputs (quantization_config.calib_dataset) or use "
            f"quantization_type {milder}; the engine was not written")
    if acc.min_cosine < threshold:
        raise ExportError(f"{what} keeps cosine {acc.min_cosine:.4f} < {threshold} required: {acc.summary()}; {hint}")
    if min_top1 is not None and acc.top1_agreement is not None and acc.top1_agreement < min_top1:
        raise ExportError(f"{what} keeps top-1 agreement {acc.top1_agreement:.1%} < {min_top1:.1%} required: "
                          f"{acc.summary()}; {hint}")


# --- Q/DQ ONNX export -----------------------------------------------------------------------
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
_NP_DTYPE: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class _QSpec:
    kind: str  # "FP8QDQ" | "NVFP4QDQ"
    amax: float
    layer: str
    role: str  # "weight" | "input"
    block_size: int = 0


def _export_plan(module: torch.nn.Module) -> dict[int, _QSpec]:
    plan: dict[int, _QSpec] = {}
    for name, q in _enabled_quantizers(module):
        layer, _, attr = name.rpartition(".")
        role = attr.removesuffix("_quantizer")
        amax = q.amax
        if amax is None or amax.numel() != 1 or role not in ("weight", "input"):
            raise ExportError(f"quantizer {name} cannot be exported: only calibrated per-tensor weight and "
                              "input quantizers are supported")
        num_bits = tuple(q.num_bits) if isinstance(q.num_bits, (tuple, list)) else q.num_bits
        blocks = q.block_sizes or {}
        if num_bits == (4, 3) and not blocks:
            plan[id(q)] = _QSpec("FP8QDQ", float(amax), layer, role)
        elif num_bits == (2, 1) and blocks.get("type") == "dynamic" and tuple(blocks.get("scale_bits", ())) == (4, 3):
            plan[id(q)] = _QSpec("NVFP4QDQ", float(amax), layer, role, int(blocks.get(-1) or NVFP4_BLOCK))
        else:
            raise ExportError(f"quantizer {name} ({num_bits} bits, blocks {blocks}) has no Q/DQ export")
    return plan


@contextlib.contextmanager
def _placeholder_quantizers(plan: dict[int, _QSpec]) -> Iterator[None]:
    """While exporting, each planned quantizer traces as one `bei.quant` node holding its settings."""
    cls = _tensor_quantizer_cls()
    original = cls.forward

    def forward(self: Any, inputs: torch.Tensor) -> torch.Tensor:
        spec = plan.get(id(self))
        if spec is None:
            return original(self, inputs)
        attrs: dict[str, Any] = {"amax": spec.amax, "layer": spec.layer, "role": spec.role,
                                 "dtype": _ONNX_DTYPE.get(inputs.dtype, TensorProto.FLOAT)}
        if spec.block_size:
            attrs["block_size"] = spec.block_size
        return torch.onnx.ops.symbolic(f"{QDOMAIN}::{spec.kind}", (inputs,), attrs,
                                       dtype=inputs.dtype, shape=inputs.shape, version=1)

    cls.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.forward = original  # type: ignore[method-assign]


def export_qdq_onnx(quantized: EngineModule, sample: Batch, path: Path) -> dict[str, int]:
    """Write `quantized` as an ONNX graph with explicit Q/DQ nodes (see the module docstring); returns
    `count_qdq(path)`. `sample`: padded rows of unequal length, as for `bei.export.onnx.export_onnx`."""
    from bei.export.onnx import EXTERNAL_DATA_BYTES, export_onnx

    plan = _export_plan(quantized)
    if not plan:
        raise ExportError("the module has no enabled quantizer: quantize it first (quantize_module)")
    path = Path(path)
    install_cpu_kernels()
    with _placeholder_quantizers(plan):
        export_onnx(quantized, sample, path)
    model = onnx.load(str(path))
    try:
        model = _lower_qdq(model)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ExportError(f"lowering the quantized graph to Q/DQ failed: {type(err).__name__}: {err}") from err
    for leftover in path.parent.glob(path.name + ".data"):
        leftover.unlink()
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)
    return count_qdq(path)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _raw_tensor(name: str, data_type: int, dims: Sequence[int], raw: bytes) -> TensorProto:
    return helper.make_tensor(name, data_type, list(dims), vals=raw, raw=True)


def _tag(node: onnx.NodeProto, layer: str) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = LAYER_KEY, layer
    return node


def _lower_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the `bei.quant` placeholders with FP8 / NVFP4 Q/DQ subgraphs (weights quantized offline)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    drop: set[str] = set()
    rename: dict[str, str] = {}
    shared: dict[tuple[str, str, float, int], str] = {}  # identical activation Q/DQ on one tensor: one copy
    kinds: set[str] = set()

    def scale_init(name: str, value: float, data_type: int) -> str:
        arr = np.array(value, dtype=_NP_DTYPE.get(data_type, np.float32))
        tensor = numpy_helper.from_array(arr, name)
        if data_type == TensorProto.BFLOAT16:
            tensor = helper.make_tensor(name, TensorProto.BFLOAT16, [], [value])
        new_inits.append(tensor)
        return name

    for node in graph.node:
        if any(i in rename for i in node.input):
            inputs = [rename.get(i, i) for i in node.input]
            del node.input[:]
            node.input.extend(inputs)
        if node.domain != QDOMAIN:
            new_nodes.append(node)
            continue
        a = _attrs(node)
        kind, amax, role = node.op_type, float(a["amax"]), a["role"].decode() if isinstance(a["role"], bytes) else a["role"]
        layer = a["layer"].decode() if isinstance(a["layer"], bytes) else a["layer"]
        dtype, block = int(a["dtype"]), int(a.get("block_size", NVFP4_BLOCK))
        x, y = node.input[0], node.output[0]
        base = f"{layer}.{role}"
        kinds.add(kind)
        key = (x, kind, amax, block)
        if x not in inits and key in shared:
            rename[y] = shared[key]
            continue
        shared[key] = y
        amax = amax if amax > 0 else 1.0
        if kind == "FP8QDQ":
            scale = scale_init(f"{base}_scale", amax / E4M3_MAX, dtype)
            if x in inits:
                w = torch.from_numpy(numpy_helper.to_array(inits[x]).astype(np.float32))
                w8 = (w / (amax / E4M3_MAX)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
                new_inits.append(_raw_tensor(f"{base}_fp8", TensorProto.FLOAT8E4M3FN, w8.shape,
                                             w8.view(torch.uint8).numpy().tobytes()))
                new_nodes.append(_tag(helper.make_node("DequantizeLinear", [f"{base}_fp8", scale], [y],
                                                       name=f"{base}/DequantizeLinear"), layer))
                drop.add(x)
            else:
                zero = f"{base}_zero_point"
                new_inits.append(_raw_tensor(zero, TensorProto.FLOAT8E4M3FN, [], b"\x00"))
                new_nodes.append(_tag(helper.make_node("QuantizeLinear", [x, scale, zero], [f"{base}_fp8"],
                                                       name=f"{base}/QuantizeLinear"), layer))
                new_nodes.append(_tag(helper.make_node("DequantizeLinear", [f"{base}_fp8", scale, zero], [y],
                                                       name=f"{base}/DequantizeLinear"), layer))
        elif kind == "NVFP4QDQ":
            s2 = amax / (E2M1_MAX * E4M3_MAX)
            s2_name = scale_init(f"{base}_global_scale", s2, TensorProto.FLOAT)
            final = y
            if dtype != TensorProto.FLOAT:  # the FP32 scales make FP32 values: back to the graph's dtype
                y = f"{base}_dequantized"
            if x in inits:
                w_f4, s_f8 = _nvfp4_weight(numpy_helper.to_array(inits[x]), block, s2, layer)
                new_inits.append(_raw_tensor(f"{base}_fp4", TensorProto.FLOAT4E2M1, w_f4[0], w_f4[1]))
                new_inits.append(_raw_tensor(f"{base}_block_scale", TensorProto.FLOAT8E4M3FN, s_f8[0], s_f8[1]))
                drop.add(x)
            else:
                new_nodes.append(_tag(helper.make_node(
                    "TRT_FP4DynamicQuantize", [x, s2_name], [f"{base}_fp4", f"{base}_block_scale"],
                    name=f"{base}/TRT_FP4DynamicQuantize", domain=TRT_DOMAIN,
                    axis=-1, block_size=block, scale_type=TensorProto.FLOAT8E4M3FN), layer))
            # weights (FP4 initializers) and activations (dynamic FP4) dequantize the same way: two levels
            new_nodes.append(_tag(helper.make_node(
                "DequantizeLinear", [f"{base}_block_scale", s2_name], [f"{base}_block_scale_f32"],
                name=f"{base}/DequantizeLinear_scale"), layer))
            new_nodes.append(_tag(helper.make_node(
                "DequantizeLinear", [f"{base}_fp4", f"{base}_block_scale_f32"], [y],
                name=f"{base}/DequantizeLinear", axis=-1, block_size=block), layer))
            if y != final:
                new_nodes.append(_tag(helper.make_node("Cast", [y], [final], name=f"{base}/Cast", to=dtype), layer))
        else:
            raise ExportError(f"unknown quantization placeholder {node.op_type}")
    for out in graph.output:
        out.name = rename.get(out.name, out.name)
    still_used = {name for node in new_nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in drop or t.name in still_used]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_inits)
    # placeholders' outputs keep their value_info; drop entries of tensors that no longer exist
    produced = {o for node in new_nodes for o in node.output}
    keep_vi = [vi for vi in graph.value_info if vi.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(keep_vi)

    opsets = [o for o in model.opset_import if o.domain != QDOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(opsets)
    default = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    default.version = max(default.version, FP4_OPSET if "NVFP4QDQ" in kinds else FP8_OPSET)
    if any(n.domain == TRT_DOMAIN for n in new_nodes):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
    if "NVFP4QDQ" in kinds:
        model.ir_version = max(model.ir_version, 11)  # FLOAT4E2M1
    return model


def _nvfp4_weight(
    weight: np.ndarray, block: int, s2: float, layer: str
) -> tuple[tuple[list[int], bytes], tuple[list[int], bytes]]:
    """(dims, packed FLOAT4E2M1 bytes) of the weight and (dims, FLOAT8E4M3FN bytes) of its block scales,
    as ModelOpt's NVFP4QTensor quantizes them (low nibble = even element)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = torch.from_numpy(weight.astype(np.float32))
    if w.shape[-1] % block:
        raise ExportError(f"{layer}: input width {w.shape[-1]} is not a multiple of the NVFP4 block size {block}")
    qt, block_scale, _ = NVFP4QTensor.quantize(w, block, weights_scaling_factor_2=torch.tensor(s2, dtype=torch.float32))
    packed = qt._quantized_data.to(torch.uint8).contiguous()
    scale_bytes = block_scale.to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy().tobytes()
    return (list(w.shape), packed.numpy().tobytes()), (list(block_scale.shape), scale_bytes)


def count_qdq(path: Path) -> dict[str, int]:
    """Node and tensor counts of a Q/DQ graph, for the build plan: QuantizeLinear, DequantizeLinear,
    TRT_FP4DynamicQuantize nodes; fp8_weights / fp4_weights (quantized weight tensors); layers
    (quantized layers, see `qdq_layers`)."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    weights: Counter[int] = Counter()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.name.endswith(".weight/DequantizeLinear"):
            weights[dtypes.get(node.input[0], 0)] += 1
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "TRT_FP4DynamicQuantize": ops.get("TRT_FP4DynamicQuantize", 0),
        "fp8_weights": weights.get(TensorProto.FLOAT8E4M3FN, 0),
        "fp4_weights": weights.get(TensorProto.FLOAT4E2M1, 0),
        "layers": len(_layers(model)),
    }


def _layers(model: onnx.ModelProto) -> list[str]:
    return sorted({p.value for node in model.graph.node for p in node.metadata_props if p.key == LAYER_KEY})


def qdq_layers(path: Path) -> list[str]:
    """The layers (torch module names) that have Q/DQ nodes in the graph at `path`."""
    return _layers(onnx.load(str(path), load_external_data=False))
