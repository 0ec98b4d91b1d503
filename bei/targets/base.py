"""The target contract: everything bei needs of a target, in one object.

A target builds engines (`build`, from a `BuildContext`) and opens them (`open`, a `Backend`, which
says whether it pads). It says where it can build (`availability`, `auto`), which quantization types
it accepts and which precision and plan details it makes of them (`plan`), the stages its build
shows, and whether an engine it built can run on a host (`check_host`). Each target is one folder
under `bei/targets/` exporting one `Target`; `bei/targets/registry.py` lists them. Modules a target
needs only to build or to run (torch, onnx, tensorrt) are imported inside its `build` and `open`, so
that reading the registry stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bei.backend import Backend
from bei.buildsteps.context import BuildContext, BuildResult
from bei.config import QuantizationType
from bei.engine.manifest import Manifest
from bei.engine.profiles import Profile
from bei.errors import EngineError
from bei.hardware import Host
from bei.kinds import Precision
from bei.modeling.spec import ModelSpec

# every quantization_type a config can ask for
ALL_QUANTIZATIONS = frozenset(q.value for q in QuantizationType)

GPU_QUANTIZED = {"fp8": Precision.FP8, "fp4": Precision.NVFP4, "fp4_mlp_only": Precision.NVFP4_MLP}


def cpu_only_int8(precision: Precision) -> str:
    """The plan's note where a GPU target meets `quantization_type: int8`, a CPU engine's quantization:
    one config serves both, as `fp8` in a config the CPU's ONNX Runtime engine builds."""
    return f"quantization_type int8 is the CPU engines' (ONNX Runtime, and the torch target's W8A8); the GPU engine is {precision.value}"


def gpu_precision(base_model: str, quantization: str) -> Precision:
    """The precision of a GPU engine: the quantized type, else FP16 for BERT-like encoders and BF16 for
    causal models (whose activations overflow FP16)."""
    if quantization in GPU_QUANTIZED:
        return GPU_QUANTIZED[quantization]
    return Precision.FP16 if base_model == "encoder_bert" else Precision.BF16


@dataclass(frozen=True)
class PlanRequest:
    """What a target needs to plan a build: the checkpoint's spec, the config's choices and the GPU."""

    spec: ModelSpec
    base_model: str
    quantization: str
    max_num_tokens: int
    max_batch_size: int
    max_input_tokens: int
    gpu: str | None
    cpu_precision: str = "fp32"  # the config's trt_llm.build.cpu_precision
    cpu_features: frozenset[str] = frozenset()  # the build host's (Host.cpu_features)


@dataclass(frozen=True)
class PlanDetails:
    """What a target adds to a plan: its precision, optimization profiles, quantized layers, notes."""

    precision: Precision
    profiles: list[Profile] = field(default_factory=list)
    quantized_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_features: list[str] = field(default_factory=list)  # CPU ISA features the engine will need


def needs_runtime(manifest: Manifest, host: Host, runtime: str) -> None:
    """An engine needs `runtime` installed (its import name, as in `Host.versions`)."""
    if runtime not in host.versions:
        raise EngineError(f"engine {manifest.name!r} needs {runtime}, which is not installed")


@dataclass(frozen=True)
class Target:
    name: str
    label: str  # how messages name it: "the ONNX Runtime CPU engine"
    summary: str  # one line for --help and the docs
    build: Callable[[BuildContext], BuildResult]
    open: Callable[[Path, Manifest, int | None], Backend]  # (engine folder, manifest, threads)
    plan: Callable[[PlanRequest], PlanDetails]
    stages: Callable[[bool], list[str]]  # the build's stages, with or without quantization
    check_host: Callable[[Manifest, Host], None]  # raise EngineError: why this host cannot run the engine
    # None where this host can build it, else what it lacks ("a CUDA GPU"); `--dry-run` plans anyway where `plannable`
    availability: Callable[[Host], str | None] = lambda host: None
    # why `--target auto` picks this target on `host` for the config's cpu_precision (targets are
    # asked in registry order), or None
    auto: Callable[[Host, str], str | None] = lambda host, cpu_precision: None
    aliases: tuple[str, ...] = ()
    quantizations: frozenset[str] = ALL_QUANTIZATIONS  # the config's quantization types it accepts
    quantizes: frozenset[str] = frozenset()  # those that add a `quantize` stage (the others build unquantized)
    cpu_precisions: frozenset[str] = frozenset({"fp32"})  # the config's cpu_precision values it builds
    uses_gpu: bool = False  # engines are built for the GPU present (the plan names it; hardware rules apply)
    plannable: bool = False  # `--dry-run` plans it on a host that cannot build it
