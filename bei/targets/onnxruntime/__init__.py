"""The ONNX Runtime CPU target (the default where no GPU is present): one fused ONNX graph, fp32 or
gated int8, run by ONNX Runtime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path

from bei.backend import Backend
from bei.buildsteps.context import BuildContext, BuildResult
from bei.engine.integrity import engine_path
from bei.engine.manifest import Manifest
from bei.hardware import Host
from bei.kinds import Precision
from bei.targets.base import PlanDetails, PlanRequest, Target, needs_runtime

NAME = "onnxruntime-cpu"


def _build(ctx: BuildContext) -> BuildResult:
    from bei.targets.onnxruntime.build import build

    return build(ctx)


def _open(folder: Path, manifest: Manifest, threads: int | None) -> Backend:
    from bei.targets.onnxruntime.backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(engine_path(folder, manifest.graph_file), manifest.graph_inputs, threads=threads)


def _plan(request: PlanRequest) -> PlanDetails:
    if request.quantization == "int8":
        return PlanDetails(Precision.INT8)
    notes = []
    if request.quantization != "no_quant":
        notes.append(f"quantization_type {request.quantization} applies to TensorRT engines; the CPU engine is fp32")
    return PlanDetails(Precision.FP32, notes=notes)


def _stages(quantized: bool) -> list[str]:
    # int8 runs after verify (it is gated against the verified fp32 graph), before write
    return ["resolve checkpoint", "read pooling", "export", "optimize", "verify", *(["quantize"] if quantized else []), "write"]


def _check_host(manifest: Manifest, host: Host) -> None:
    needs_runtime(manifest, host, "onnxruntime")


def _auto(host: Host, cpu_precision: str) -> str | None:
    if cpu_precision != "fp32":
        return None  # bf16 CPU engines are the torch target's
    return "auto: no CUDA GPU, so the ONNX Runtime CPU engine" if host.gpu is None else "auto: the ONNX Runtime CPU engine"


TARGET = Target(
    name=NAME,
    label="the ONNX Runtime CPU engine",
    summary="ONNX Runtime on the CPU: one fused graph, fp32 or gated int8 (the default without a GPU)",
    aliases=("onnxruntime",),
    build=_build,
    open=_open,
    plan=_plan,
    stages=_stages,
    check_host=_check_host,
    availability=lambda host: None if "onnxruntime" in host.versions else "the onnxruntime package",
    auto=_auto,
    quantizes=frozenset({"int8"}),
)
