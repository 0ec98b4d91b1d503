"""The TensorRT target: a TensorRT plan compiled for the GPU present (FP16/BF16, or FP8/NVFP4 through
ModelOpt), with optimization profiles from the token budget. Builds where a CUDA GPU and the
tensorrt package are present; `--dry-run` plans it anywhere."""

from __future__ import annotations

from pathlib import Path

from bei.backend import Backend
from bei.buildsteps.context import BuildContext, BuildResult
from bei.engine.integrity import engine_path
from bei.engine.manifest import Manifest
from bei.engine.profiles import derive_profiles
from bei.errors import EngineError
from bei.hardware import Host
from bei.targets.base import GPU_QUANTIZED, PlanDetails, PlanRequest, Target, cpu_only_int8, gpu_precision

NAME = "tensorrt"


def _build(ctx: BuildContext) -> BuildResult:
    from bei.targets.tensorrt.build import build

    return build(ctx)


def _open(folder: Path, manifest: Manifest, threads: int | None) -> Backend:
    from bei.targets.tensorrt.backend import TensorRTBackend

    return TensorRTBackend(engine_path(folder, manifest.graph_file), manifest.graph_inputs, manifest.graph_output, manifest.profiles)


def _plan(request: PlanRequest) -> PlanDetails:
    from bei.modeling.module import linear_layers
    from bei.modeling.quant_layers import quantized_layer_names

    precision = gpu_precision(request.base_model, request.quantization)
    qtype = request.quantization if request.quantization in GPU_QUANTIZED else ""
    return PlanDetails(
        precision,
        profiles=derive_profiles(request.max_num_tokens, request.max_batch_size, request.max_input_tokens),
        quantized_layers=quantized_layer_names(linear_layers(request.spec), qtype) if qtype else [],
        notes=[cpu_only_int8(precision)] if request.quantization == "int8" else [],
    )


def _stages(quantized: bool) -> list[str]:
    return ["resolve checkpoint", "read pooling", *(["quantize"] if quantized else []), "export", "compile", "verify", "write"]


def _check_host(manifest: Manifest, host: Host) -> None:
    """The same GPU type and the same TensorRT version as the build."""
    built_gpu = manifest.target.gpu
    built_trt = manifest.target.versions.get("tensorrt")
    rebuild = "rebuild it on this machine with `bei build <config.yaml> --target tensorrt`"
    if host.gpu is None:
        raise EngineError(
            f"engine {manifest.name!r} was built for the GPU {built_gpu} and this machine has no GPU; "
            f"build a CPU engine (the default target here) or serve it on a {built_gpu}"
        )
    if host.gpu != built_gpu:
        raise EngineError(f"engine {manifest.name!r} was built for {built_gpu}, not for this machine's {host.gpu}; {rebuild}")
    if "tensorrt" not in host.versions:
        raise EngineError(f"engine {manifest.name!r} needs TensorRT {built_trt}, which is not installed")
    if host.versions["tensorrt"] != built_trt:
        raise EngineError(
            f"engine {manifest.name!r} was built with TensorRT {built_trt}; this machine has {host.versions['tensorrt']}; {rebuild}"
        )


def _availability(host: Host) -> str | None:
    missing = [what for what, ok in (("a CUDA GPU", host.gpu is not None), ("the tensorrt package", "tensorrt" in host.versions)) if not ok]
    return " and ".join(missing) or None


def _auto(host: Host, cpu_precision: str) -> str | None:
    if host.gpu is None or "tensorrt" not in host.versions:
        return None
    return f"auto: {host.gpu} and TensorRT {host.versions['tensorrt']} are present"


TARGET = Target(
    name=NAME,
    label="the TensorRT target",
    summary="TensorRT plans for the GPU present: FP16/BF16, FP8 and NVFP4 through ModelOpt",
    build=_build,
    open=_open,
    plan=_plan,
    stages=_stages,
    check_host=_check_host,
    availability=_availability,
    auto=_auto,
    quantizes=frozenset(GPU_QUANTIZED),
    uses_gpu=True,
    plannable=True,
)
