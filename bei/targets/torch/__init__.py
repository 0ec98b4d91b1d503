"""The torch target: bei's own packed modules (no computation on padding, variable-length flash
attention), FP16/BF16 or FP8 on CUDA GPUs with torch.compile's code saved per GPU type and CUDA
graphs for small batches; fp32, eager, on the CPU (where it is tested against transformers)."""

from __future__ import annotations

from pathlib import Path

from bei.backend import Backend
from bei.buildsteps.context import BuildContext, BuildResult
from bei.engine.manifest import Manifest
from bei.errors import ConfigError, EngineError
from bei.hardware import Host, bf16_units
from bei.kinds import Precision
from bei.targets.base import PlanDetails, PlanRequest, Target, cpu_only_int8, gpu_precision, needs_runtime

NAME = "torch"


def _build(ctx: BuildContext) -> BuildResult:
    from bei.targets.torch.build import build

    return build(ctx)


def _open(folder: Path, manifest: Manifest, threads: int | None) -> Backend:
    from bei.targets.torch.backend import TorchBackend

    return TorchBackend.load(folder, manifest, threads=threads)


def _fp8_layers(request: PlanRequest) -> list[str]:
    """The Linear layers FP8 quantizes: bei's packed module (fused q/k/v in encoders), built on the
    meta device, through the same selection the build uses."""
    import torch

    from bei.modeling.packed.fp8 import fp8_layers
    from bei.modeling.packed.model import PackedEngineModule, make_body, read_config

    with torch.device("meta"):
        module = PackedEngineModule(request.spec, make_body(request.spec, read_config(request.spec.path)), load_heads=False)
    return fp8_layers(module)


INT8_NEEDS_BF16 = (
    "trt_llm.build.quantization_type: 'int8' on the torch target is the CPU's W8A8 engine, whose layers that "
    "int8 would make inaccurate run bf16 GEMMs: it needs cpu_precision bf16 (int8 with cpu_precision fp32 is "
    "the ONNX Runtime engine's, --target onnxruntime-cpu)"
)


def _plan(request: PlanRequest) -> PlanDetails:
    if request.gpu is None and request.quantization == "int8":
        if request.cpu_precision != "bf16":
            raise ConfigError(INT8_NEEDS_BF16)
        return PlanDetails(
            Precision.INT8,
            notes=[
                "int8 on the CPU: W8A8 (int8 weights per channel, int8 activations per token, SmoothQuant) on the kinds "
                "of layer that keep quantization_config.min_accuracy on held-out texts, bf16 GEMMs for the others and for "
                "each sequence's first and last token; attention in bf16 with an fp32 softmax (bei's CPU kernel, where it "
                "runs); LayerNorm, pooling and the heads in fp32"
            ],  # fmt: skip
            cpu_features=bf16_units(request.cpu_features)[:1],
        )
    if request.gpu is None and request.quantization == "no_quant":
        if request.cpu_precision == "bf16":
            return PlanDetails(
                Precision.BF16,
                notes=[
                    "bf16 on the CPU: every transformer GEMM in bf16 with fp32 accumulation, attention too (bei's CPU "
                    "kernel, where it runs) with an fp32 softmax; LayerNorm, pooling and the heads in fp32"
                ],  # fmt: skip
                cpu_features=bf16_units(request.cpu_features)[:1],
            )
        return PlanDetails(Precision.FP32)
    precision = gpu_precision(request.base_model, request.quantization)
    if request.quantization == "int8":
        return PlanDetails(precision, notes=[cpu_only_int8(precision)])
    if precision != Precision.FP8:
        return PlanDetails(precision)
    notes = ["fp8 on the CPU runs torch._scaled_mm's CPU kernel: for the accuracy figures, not for speed"] if request.gpu is None else []
    return PlanDetails(precision, quantized_layers=_fp8_layers(request), notes=notes)


def _stages(quantized: bool) -> list[str]:
    return ["resolve checkpoint", "read pooling", "load", *(["quantize"] if quantized else []), "verify", "compile", "write"]


def _check_host(manifest: Manifest, host: Host) -> None:
    """A torch engine built on the CPU runs wherever torch does; one built on a GPU needs that GPU type
    (its compiled code and FP8 kernels are per GPU); another torch version only recompiles."""
    needs_runtime(manifest, host, "torch")
    missing = [f for f in manifest.target.cpu_features if f not in host.cpu_features]
    if missing:
        raise EngineError(
            f"engine {manifest.name!r} ({manifest.precision} on the CPU) needs a CPU with {', '.join(missing)}, which this "
            "machine's CPU lacks; rebuild it here with `bei build <config.yaml>` (trt_llm.build.cpu_precision: fp32 where the "
            "CPU has no bf16 units)"
        )
    built_gpu = manifest.target.gpu
    if built_gpu is None:
        return
    rebuild = "rebuild it on this machine with `bei build <config.yaml> --target torch`"
    if host.gpu is None:
        raise EngineError(f"engine {manifest.name!r} was built for the GPU {built_gpu} and this machine has no GPU; {rebuild}")
    if host.gpu != built_gpu:
        raise EngineError(f"engine {manifest.name!r} was built for {built_gpu}, not for this machine's {host.gpu}; {rebuild}")


def _auto(host: Host, cpu_precision: str) -> str | None:
    if host.gpu is None:
        return "auto: cpu_precision bf16, built by the torch target on the CPU" if cpu_precision == "bf16" else None
    return f"auto: {host.gpu} is present and the tensorrt package is not, so the torch target"


TARGET = Target(
    name=NAME,
    label="the torch target",
    summary="bei's packed torch modules: FP16/BF16/FP8 on CUDA GPUs (compiled, CUDA graphs); fp32, bf16 and int8 on the CPU",
    build=_build,
    open=_open,
    plan=_plan,
    stages=_stages,
    check_host=_check_host,
    availability=lambda host: None if "torch" in host.versions else "the torch package",
    auto=_auto,
    quantizations=frozenset({"no_quant", "fp8", "int8"}),
    quantizes=frozenset({"fp8", "int8"}),
    cpu_precisions=frozenset({"fp32", "bf16"}),
    uses_gpu=True,
)
