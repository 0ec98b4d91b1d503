"""The torch target: bei's packed modules, their weights in bei's layout and precision, and (on CUDA)
torch.compile's compiled code for this GPU type, saved so `bei serve` does not compile again.

    load:     the checkpoint as a packed module (fp32, CPU) and as the transformers reference;
              the packed module must equal the reference at fp32 tolerance before anything else
    quantize: (fp8) E4M3 weights with per-channel scales, activations per row (or static scales
              calibrated on `quantization_config`); (int8, the CPU) W8A8 with SmoothQuant on the
              kinds of layer that keep the accuracy, bf16 GEMMs for the rest; the accuracy gate on
              held-out texts
    verify:   the module in its serving precision and device against the fp32 outputs
    compile:  (CUDA) torch.compile over the token buckets served, cache artifacts saved
    write:    weights.safetensors, tokenizer files, manifest (GPU, compute capability, torch, CUDA)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bei.accuracy import accuracy_of_outputs, compare, require_accuracy, require_agreement
from bei.backend import Batch
from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.manifest import write_engine
from bei.buildsteps.plan import BuildPlan
from bei.buildsteps.samples import reference_outputs, sample_batch
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import TargetInfo
from bei.errors import ExportError
from bei.modeling.module import build_module, input_names
from bei.modeling.packed.bf16 import bf16_layers, to_bf16
from bei.modeling.packed.blocks import use_cpu_kernels
from bei.modeling.packed.fp8 import calibrate_static_scales, quantize_fp8
from bei.modeling.packed.model import PackedEngineModule, build_packed_module, pad_token_id, read_config
from bei.modeling.spec import ModelSpec
from bei.quantization.calibration import builtin_heldout_batch
from bei.targets.torch.backend import (
    COMPILE_CACHE_FILE,
    WARM_TOKENS,
    WEIGHTS_FILE,
    TorchBackend,
    runs_compiled,
    save_compile_cache,
)

# the packed fp32 module must equal transformers as the ONNX Runtime engine must
FP32_MIN_COSINE = 0.99999
FP32_MAX_ABS_DIFF = 2e-3
# an unquantized fp16 / bf16 module against the fp32 reference
MIN_COSINE = {"fp32": FP32_MIN_COSINE, "fp16": 0.999, "bf16": 0.995}
# the CPU's bf16 engine (bf16 GEMMs, fp32 elsewhere) against the fp32 reference
CPU_BF16_MIN_COSINE = 0.9999


def device_and_dtype(plan: BuildPlan, base_model: str) -> tuple[str, torch.dtype]:
    """Where the engine runs and its activation dtype: fp32 on the CPU; fp16 / bf16 on CUDA."""
    if plan.gpu is None or not torch.cuda.is_available():
        return "cpu", torch.float32
    if plan.precision == "fp16":
        return "cuda", torch.float16
    return "cuda", torch.bfloat16 if base_model == "encoder" or plan.precision in ("bf16", "fp8") else torch.float16


def versions() -> dict[str, str]:
    found = {"torch": str(torch.__version__)}
    if torch.version.cuda:
        found["cuda"] = str(torch.version.cuda)
    return found


def _run(module: PackedEngineModule, batch: Batch, names: list[str]) -> np.ndarray:
    return TorchBackend(module, names).infer(batch)


def _real_tokens(output: np.ndarray, batch: Batch) -> np.ndarray:
    """Per-token outputs with padded positions zeroed: the packed module computes none."""
    if output.ndim == 3:
        return output * batch.attention_mask[:, :, None]
    return output


def build(ctx: BuildContext) -> BuildResult:
    spec, plan, progress = ctx.spec, ctx.plan, ctx.progress
    names = input_names(spec)
    device, dtype = device_and_dtype(plan, spec.base_model)
    cpu_bf16 = device == "cpu" and plan.precision == "bf16"  # bf16 GEMMs in an fp32 module
    quantization: dict[str, Any] | None = None
    with staged_engine_dir(ctx.engine_dir) as staging:
        with progress.stage("load"):
            sample = sample_batch(spec, ctx.tokenizer)
            reference = _real_tokens(reference_outputs(build_module(spec), sample), sample)  # transformers, fp32
            module = build_packed_module(spec)
            exact = compare(reference, _run(module, sample, names))
            require_agreement(exact, min_cosine=FP32_MIN_COSINE, max_abs_diff=FP32_MAX_ABS_DIFF, what="bei's packed module")
            progress.note(
                f"packed {type(module.body).__name__} = transformers: cosine {exact.min_cosine:.7f}, max abs diff {exact.max_abs_diff:.1e}"
            )
        check_batch, check_reference = sample, reference
        if plan.precision == "fp8":
            with progress.stage("quantize"):
                quantization, check_batch, check_reference = _quantize_fp8(ctx, module, device, dtype, names)
        elif plan.precision == "int8":
            with progress.stage("quantize"):
                quantization, check_batch, check_reference, module = _quantize_int8(ctx, module, names)
        else:
            module = module.to(device=device, dtype=dtype)
            if cpu_bf16:  # judged on held-out texts too: the 4 samples say little of the rounding
                check_batch = builtin_heldout_batch(ctx.config.trt_llm.build.quantization_config, spec, ctx.tokenizer)
                check_reference = _run(module, check_batch, names)
                bf16, attention = len(to_bf16(module)), _kernels_note(*use_cpu_kernels(module))
                progress.note(f"{bf16} Linear layers in bf16 (fp32 accumulation), the rest fp32; {attention}")
        with progress.stage("verify"):
            agreement = compare(check_reference, _run(module, check_batch, names))
            if quantization is None:
                min_cosine = CPU_BF16_MIN_COSINE if cpu_bf16 else MIN_COSINE[plan.precision]
                require_agreement(agreement, min_cosine=min_cosine, max_abs_diff=float("inf"),
                                  what=f"the torch {plan.precision} engine on {device}")  # fmt: skip
            progress.note(f"{plan.precision} on {device}: cosine {agreement.min_cosine:.6f}, max abs diff {agreement.max_abs_diff:.1e}")
        with progress.stage("compile"):
            if runs_compiled(device, plan.precision):
                saved = _compile(module, names, spec, staging)
                buckets = " (every CUDA-graph bucket)" if device == "cuda" else ""
                progress.note(
                    f"torch.compile warmed over {len(WARM_TOKENS)} token counts{buckets}; "
                    f"{saved / 1e6:.1f} MB of compiled code in {COMPILE_CACHE_FILE}"
                )
            else:
                progress.note("fp32 CPU engine: runs eagerly, nothing to compile")
        from safetensors.torch import save_model

        save_model(module, str(staging / WEIGHTS_FILE))  # tied weights (MLM decoders) stored once
        gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
        capability = ".".join(map(str, torch.cuda.get_device_capability(0))) if device == "cuda" else None
        return write_engine(
            ctx,
            staging,
            agreement,
            graph_file=WEIGHTS_FILE,
            target=TargetInfo(
                name=plan.target,
                versions=versions(),
                gpu=gpu,
                compute_capability=capability,
                device=device,
                dtype=str(dtype).removeprefix("torch."),
                cpu_features=plan.cpu_features,
            ),  # fmt: skip
            reference="transformers (torch, fp32, CPU)",
            quantization=quantization,
        )


def _quantize_fp8(
    ctx: BuildContext, module: PackedEngineModule, device: str, dtype: torch.dtype, names: list[str]
) -> tuple[dict[str, Any], Batch, np.ndarray]:
    """FP8 layers in place; the accuracy against the unquantized module on held-out texts, gated.
    Returns the manifest's `quantization` entry, the held-out batch and the unquantized outputs on it."""
    from bei.quantization import calibration

    spec = ctx.spec
    qcfg = ctx.config.trt_llm.build.quantization_config
    texts, max_len, heldout = calibration.calibration_inputs(qcfg, spec, ctx.tokenizer, ctx.config_dir)
    reference = _run(module, heldout, names)  # the unquantized packed module (= transformers)
    module.to(device=device, dtype=dtype)
    layers = quantize_fp8(module)
    if not layers:
        raise ExportError(f"fp8: {spec.architecture} has no Linear layer FP8 can quantize (widths must be multiples of 16)")
    static = qcfg.activation_scales == "static"
    if static:
        batches = calibration.make_batches(spec, ctx.tokenizer, texts, max_len, batch_size=16)
        calibrate_static_scales(module, lambda: [_run(module, b, names) for b in batches])
    accuracy = accuracy_of_outputs(reference, _run(module, heldout, names), heldout, spec.task, qtype="fp8")
    require_accuracy(accuracy, qcfg.min_accuracy)
    ctx.progress.note(
        f"{len(layers)} Linear layers in FP8 ({'static' if static else 'dynamic per-row'} activation scales); {accuracy.summary()}"
    )
    entry = {
        "type": "fp8",
        "activation_scales": "static" if static else "dynamic",
        "layers": layers,
        "calibration": qcfg.model_dump(),
        "accuracy": accuracy.as_dict(),
    }
    return entry, heldout, reference


def _kernels_note(attention_layers: int, fused_mlps: int) -> str:
    attention = (
        f"attention in {attention_layers} layers on bei's bf16 CPU kernel (bei/modeling/packed/cpu_attention.py)"
        if attention_layers
        else "attention on torch's scaled_dot_product_attention"
    )
    return f"{attention}; the activation of {fused_mlps} MLPs in their up projection's GEMM" if fused_mlps else attention


def _quantize_int8(
    ctx: BuildContext, module: PackedEngineModule, names: list[str]
) -> tuple[dict[str, Any], Batch, np.ndarray, PackedEngineModule]:
    """The CPU's W8A8 engine: SmoothQuant's scales from the calibration texts, then the Linear layers
    that take int8, by kind, chosen on held-out texts (`choose_int8_kinds`) so that half the error budget
    (`1 - min_accuracy`) stays for texts unlike them; the other layers run bf16 GEMMs, and so do each
    sequence's first and last token in the int8 layers (`bf16_edges`). Returns the
    manifest's `quantization` entry, the held-out batch, the unquantized outputs on it and the
    quantized module."""
    import copy

    from bei.modeling.packed.int8 import SMOOTHING_ALPHA, choose_int8_kinds, chosen_kinds, groups_of, quantize_int8
    from bei.modeling.packed.observe import input_amax
    from bei.quantization import calibration

    spec, progress = ctx.spec, ctx.progress
    qcfg = ctx.config.trt_llm.build.quantization_config
    # held-out sentences and queries of one to three words: W8A8 rounds the few tokens of a short
    # query worst (on all-MiniLM-L6-v2, q/k/v in int8 kept 0.9998 on the sentences and 0.9990 on those)
    texts, max_len, heldout = calibration.calibration_inputs(qcfg, spec, ctx.tokenizer, ctx.config_dir, short=32)
    reference = _run(module, heldout, names)  # the unquantized packed module (= transformers)
    layers = bf16_layers(module)
    batches = calibration.make_batches(spec, ctx.tokenizer, texts, max_len, batch_size=16)
    amax = input_amax(module, layers, lambda: [_run(module, b, names) for b in batches])

    kinds = groups_of(layers)

    def quantized(int8_kinds: Sequence[str]) -> PackedEngineModule:
        int8 = {name for kind in int8_kinds for name in kinds[kind]}
        copied = copy.deepcopy(module)
        quantize_int8(copied, [n for n in layers if n in int8], amax, bf16_edges=True)
        to_bf16(copied, [n for n in layers if n not in int8])
        use_cpu_kernels(copied)  # judged as served
        return copied

    def min_cosine(int8_kinds: Sequence[str]) -> float:
        return accuracy_of_outputs(reference, _run(quantized(int8_kinds), heldout, names), heldout, spec.task).min_cosine

    search_target = 1 - (1 - qcfg.min_accuracy) / 2
    trials = choose_int8_kinds(list(kinds), min_cosine, search_target)
    chosen = chosen_kinds(trials)
    if not chosen:
        best = max(trials, key=lambda t: t.min_cosine)
        raise ExportError(
            f"int8 quantization: no kind of Linear layer keeps cosine {search_target:.5f} in int8 (half the error budget "
            f"of quantization_config.min_accuracy {qcfg.min_accuracy}) on held-out texts; the best, {best.kinds[0]}, keeps "
            f"{best.min_cosine:.5f}; lower min_accuracy, or build without quantization_type int8"
        )
    module = quantized(chosen)
    accuracy = accuracy_of_outputs(reference, _run(module, heldout, names), heldout, spec.task, qtype="int8")
    require_accuracy(accuracy, qcfg.min_accuracy)
    int8_layers = sorted(name for kind in chosen for name in kinds[kind])
    progress.note(
        f"{len(int8_layers)} of {len(layers)} Linear layers W8A8 ({', '.join(chosen)}; each sequence's first and last "
        f"token in bf16), the rest bf16: each kind alone, then together while the held-out cosine stays >= {search_target:.5f}; "
        f"{_kernels_note(*use_cpu_kernels(module))}; {accuracy.summary()}"
    )
    entry = {
        "type": "int8",
        "scheme": "W8A8: int8 weights per output channel, int8 activations per token (asymmetric), SmoothQuant",
        "smoothing_alpha": SMOOTHING_ALPHA,
        "bf16_edges": True,  # each sequence's first and last token keep bf16 GEMMs in the int8 layers
        "layers": int8_layers,
        "bf16_layers": sorted(set(layers) - set(int8_layers)),
        "search": {
            "target": search_target,
            "trials": [{"int8": list(t.kinds), "min_cosine": round(t.min_cosine, 6), "kept": t.kept} for t in trials],
        },
        "calibration": qcfg.model_dump(),
        "accuracy": accuracy.as_dict(),
    }
    return entry, heldout, reference, module


def _compile(module: PackedEngineModule, names: list[str], spec: ModelSpec, folder: Path) -> int:
    """Compile the module for this GPU (or CPU) over every token bucket served; keep torch.compile's artifacts."""
    TorchBackend.compiled_and_warm(module, names, pad_token_id(read_config(spec.path)), spec.max_seq_len, spec.padding_side)
    return save_compile_cache(folder)
