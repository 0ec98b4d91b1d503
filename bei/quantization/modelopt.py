"""Post-training quantization (FP8, NVFP4) with NVIDIA ModelOpt, and its CPU kernels.

The flow, all of it runnable on the CPU (simulated "fake" quantization):

    reference = build_module(spec)
    quantized = quantize_module(reference, tokenizer, "fp8", calib_texts, max_seq_len)  # a quantized copy
    held_out = calibration.heldout_batch(spec, tokenizer, calib_texts, max_seq_len)
    acc = measure_accuracy(reference, quantized, held_out, spec.task)
    accuracy.require_accuracy(acc, 0.99)             # ExportError with the figures below the threshold
    qdq.export_qdq_onnx(quantized, sample_batch, path)   # explicit Q/DQ graph for TensorRT
    qdq.count_qdq(path), qdq.qdq_layers(path)            # what the plan shows

Which layers are quantized: the `nn.Linear` layers of the transformer (weights and their input activations,
per-tensor FP8 E4M3, or NVFP4: E2M1 values in blocks of 16 with FP8 block scales and a per-tensor FP32
scale). The task heads (pooler, classifier, score, MLM / SPLADE head, sentence-transformers Dense layers)
and every non-Linear op (embeddings, LayerNorm, softmax, the attention matmuls) stay in high precision.
`fp4_mlp_only` quantizes the feed-forward Linear layers only (attention projections excluded).

ModelOpt's NVFP4 fake quantization runs on CUDA only (a CUDA extension or a Triton kernel); on CPU tensors
`install_cpu_kernels` routes it to `nvfp4_fake_quant`, a torch port of ModelOpt's Triton kernel. FP8 fake
quantization is ModelOpt's own eager torch code on the CPU.
The Q/DQ ONNX export of the quantized module is `bei.quantization.qdq`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bei.accuracy import Accuracy, accuracy_of_outputs
from bei.backend import Batch
from bei.errors import ExportError
from bei.kinds import Task
from bei.modeling.module import EngineModule, input_names
from bei.modeling.quant_layers import NVFP4_BLOCK, QUANT_TYPES, excluded_patterns
from bei.quantization.calibration import make_batches
from bei.text.tokenizer import TokenizerRuntime

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
E2M1_MAX = 6.0


# --- modelopt -------------------------------------------------------------------------------
def _mtq() -> Any:
    """`modelopt.torch.quantization`, imported quietly; ExportError naming the extra when it is missing."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise ExportError(
            f"quantization needs NVIDIA ModelOpt, which cannot be imported ({err}); install it with `pip install 'bei[quant]'`"
        ) from err
    return mtq


def tensor_quantizer_cls() -> type[torch.nn.Module]:
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
            f"{name}.*" for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear) and layer.in_features % NVFP4_BLOCK
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
    q = torch.where(
        a <= 0.25,
        0.0,
        torch.where(
            a < 0.75,
            0.5,
            torch.where(
                a <= 1.25,
                1.0,
                torch.where(a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))),
            ),
        ),
    )
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
        raise ExportError(
            f"{qtype} quantization of {module.spec.architecture} failed: {type(err).__name__}: {err}\n{out.getvalue()[-2000:]}"
        ) from err
    layers = quantized_layers(module)
    if not layers:
        raise ExportError(f"{qtype} quantization of {module.spec.architecture} quantized no layer")
    module.bei_quantization = qtype  # type: ignore[assignment]
    log.info("%s: quantized %d layers with %d calibration texts", qtype, len(layers), len(calib_texts))
    return module


def enabled_quantizers(module: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    cls = tensor_quantizer_cls()
    for name, sub in module.named_modules():
        if isinstance(sub, cls) and sub.is_enabled:
            yield name, sub


def quantized_layers(module: torch.nn.Module) -> list[str]:
    """Names of the layers whose weights are quantized."""
    return sorted(name.rsplit(".", 1)[0] for name, _ in enabled_quantizers(module) if name.endswith(".weight_quantizer"))


def _run(module: EngineModule, batch: Batch) -> np.ndarray:
    with torch.no_grad():
        return module(**_feeds(module, batch)).float().cpu().numpy().astype(np.float64)


def measure_accuracy(reference: EngineModule, quantized: EngineModule, batch: Batch, task: Task | str) -> Accuracy:
    """Compare `quantized` with `reference` on `batch` (held-out inputs, not the calibration texts)."""
    return accuracy_of_outputs(
        _run(reference, batch), _run(quantized, batch), batch, task, qtype=getattr(quantized, "bei_quantization", None)
    )
