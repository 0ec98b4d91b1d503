"""What a build will make, decided before any heavy work: target, precision, profiles, the layers
quantization touches and a memory estimate. `bei build --dry-run` prints it; no GPU is needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bei.engine.compat import Host
from bei.errors import ConfigError, EngineError
from bei.export.profiles import Profile, derive_profiles
from bei.export.quant_layers import quantized_layer_names
from bei.hardware import compute_capability, hardware_problems
from bei.modeling.spec import ModelSpec

CPU_TARGET = "onnxruntime-cpu"
GPU_TARGET = "tensorrt"
TORCH_TARGET = "torch"
TARGET_ALIASES = {
    "onnxruntime": CPU_TARGET, CPU_TARGET: CPU_TARGET, GPU_TARGET: GPU_TARGET, TORCH_TARGET: TORCH_TARGET, "auto": "auto",
}  # fmt: skip
# quantization types each target builds (the CPU engine is fp32 whatever the config says)
TORCH_QUANT = ("no_quant", "fp8")

BYTES_PER_WEIGHT = {"int8": 1.0, "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "nvfp4": 0.5625, "nvfp4-mlp": 1.0}


@dataclass(frozen=True)
class TargetChoice:
    name: str
    reason: str


def choose_target(requested: str, host: Host, *, dry_run: bool = False) -> TargetChoice:
    """`auto` picks TensorRT when a CUDA GPU and the tensorrt package are present, the torch target on
    a CUDA GPU without TensorRT, else the ONNX Runtime CPU engine."""
    if requested not in TARGET_ALIASES:
        raise ConfigError(f"--target: {requested!r} is not one of auto, tensorrt, torch, onnxruntime")
    wanted = TARGET_ALIASES[requested]
    has_trt = "tensorrt" in host.versions
    if wanted == CPU_TARGET:
        return TargetChoice(CPU_TARGET, "asked for with --target")
    if wanted == TORCH_TARGET:
        where = f"on {host.gpu}" if host.gpu else "on the CPU (no CUDA GPU here): fp32, eager"
        return TargetChoice(TORCH_TARGET, f"asked for with --target, {where}")
    if wanted == GPU_TARGET:
        missing = [what for what, ok in (("a CUDA GPU", host.gpu is not None), ("the tensorrt package", has_trt)) if not ok]
        if missing and dry_run:
            return TargetChoice(GPU_TARGET, f"asked for with --target; a plan only: this machine lacks {' and '.join(missing)}")
        if missing:
            raise EngineError(
                f"--target tensorrt needs {' and '.join(missing)}, which this machine lacks; "
                "build the CPU engine (--target onnxruntime) or build on the GPU you will serve on"
            )
        return TargetChoice(GPU_TARGET, f"asked for with --target, on {host.gpu}")
    if host.gpu is not None and has_trt:
        return TargetChoice(GPU_TARGET, f"auto: {host.gpu} and TensorRT {host.versions['tensorrt']} are present")
    if host.gpu is not None:
        return TargetChoice(TORCH_TARGET, f"auto: {host.gpu} is present and the tensorrt package is not, so the torch target")
    return TargetChoice(CPU_TARGET, "auto: no CUDA GPU, so the ONNX Runtime CPU engine")


def precision_for(target: str, base_model: str, quantization: str, gpu: str | None = None) -> str:
    if target == CPU_TARGET and quantization == "int8":
        return "int8"
    if target == CPU_TARGET or (target == TORCH_TARGET and gpu is None and quantization == "no_quant"):
        return "fp32"
    if quantization == "fp8":
        return "fp8"
    if quantization == "fp4":
        return "nvfp4"
    if quantization == "fp4_mlp_only":
        return "nvfp4-mlp"
    return "fp16" if base_model == "encoder_bert" else "bf16"


@dataclass(frozen=True)
class BuildPlan:
    target: str
    target_reason: str
    precision: str
    gpu: str | None
    compute_capability: str | None
    max_input_tokens: int
    max_num_tokens: int
    max_batch_size: int
    profiles: list[Profile] = field(default_factory=list)
    quantized_layers: list[str] = field(default_factory=list)
    parameters: int = 0
    weights_bytes: int = 0
    activation_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [p.as_dict() for p in self.profiles]
        return data

    def render(self) -> str:
        gib = 1024**3
        lines = [
            f"target:     {self.target} ({self.target_reason})",
            f"precision:  {self.precision}",
            f"gpu:        {self.gpu or 'none'}" + (f" (compute capability {self.compute_capability})" if self.compute_capability else ""),
            f"max input:  {self.max_input_tokens} tokens; budget {self.max_num_tokens} tokens / call; batch <= {self.max_batch_size}",
        ]
        for i, p in enumerate(self.profiles):
            lines.append(f"profile {i}:  batch {p.batch[0]}/{p.batch[1]}/{p.batch[2]}, seq {p.seq[0]}/{p.seq[1]}/{p.seq[2]} (min/opt/max)")
        if self.quantized_layers:
            lines.append(f"quantized:  {len(self.quantized_layers)} Linear layers, e.g. {', '.join(self.quantized_layers[:3])}")
        lines.append(
            f"memory:     ~{(self.weights_bytes + self.activation_bytes) / gib:.2f} GiB "
            f"(weights {self.weights_bytes / gib:.2f} GiB for {self.parameters / 1e6:.1f}M parameters, "
            f"activations ~{self.activation_bytes / gib:.2f} GiB at the largest profile)"
        )
        lines += [f"note:       {n}" for n in self.notes]
        return "\n".join(lines)


def _linear_layers(spec: ModelSpec) -> tuple[dict[str, int], int, int, int]:
    """Linear layers (as named in the engine module, with their input widths), parameter count,
    hidden and intermediate sizes, without loading weights."""
    import torch
    import transformers

    from bei.modeling.module import auto_class

    config = transformers.AutoConfig.from_pretrained(str(spec.path))
    with torch.device("meta"):
        model = auto_class(spec.task).from_config(config)
    linears = {f"transformer.{name}": m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    params = sum(p.numel() for p in model.parameters())
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "hidden_dim", 0) or 4 * spec.hidden_size)
    return linears, params, spec.hidden_size, intermediate


def _torch_fp8_layers(spec: ModelSpec) -> list[str]:
    """The Linear layers the torch target's FP8 quantizes: bei's packed module (fused q/k/v in
    encoders), built on the meta device, through the same selection the build uses."""
    import torch

    from bei.modeling.packed.fp8 import fp8_layers
    from bei.modeling.packed.model import PackedEngineModule, make_body, read_config

    with torch.device("meta"):
        module = PackedEngineModule(spec, make_body(spec, read_config(spec.path)), load_dense=False)
    return fp8_layers(module)


# plan precision -> the config's quantization_type
_QTYPE = {"fp8": "fp8", "nvfp4": "fp4", "nvfp4-mlp": "fp4_mlp_only"}


def check_target_hardware(target: TargetChoice, base_model: str, quantization: str, host: Host) -> None:
    """The target must build the config's quantization, and the GPU present run it (the config's own
    accelerator was checked at load)."""
    if quantization == "int8" and target.name != CPU_TARGET:
        raise ConfigError(
            f"trt_llm.build.quantization_type: 'int8' is built for the ONNX Runtime CPU engine only, not for target "
            f"{target.name}; use no_quant or fp8 on GPUs, or --target onnxruntime"
        )
    if target.name == TORCH_TARGET and quantization not in TORCH_QUANT:
        raise ConfigError(
            f"trt_llm.build.quantization_type: {quantization!r} is built by the TensorRT target only; "
            f"the torch target builds {' and '.join(TORCH_QUANT)}"
        )
    if target.name not in (GPU_TARGET, TORCH_TARGET) or host.gpu is None:
        return
    cap = tuple(int(x) for x in host.compute_capability.split(".")) if host.compute_capability else compute_capability(host.gpu)
    problems = hardware_problems(base_model, quantization, cap, f"this machine's {host.gpu}")  # type: ignore[arg-type]
    if problems:
        raise ConfigError("; ".join(problems))


def make_plan(
    spec: ModelSpec,
    *,
    target: TargetChoice,
    base_model: str,
    quantization: str,
    max_num_tokens: int,
    max_batch_size: int,
    accelerator: str | None,
    host: Host,
) -> BuildPlan:
    notes: list[str] = []
    gpu = host.gpu if target.name in (GPU_TARGET, TORCH_TARGET) else None
    capability = host.compute_capability if gpu else None
    if gpu is None and accelerator and target.name == GPU_TARGET:  # a plan made away from the GPU
        cap = compute_capability(accelerator)
        capability = f"{cap[0]}.{cap[1]}" if cap else None
        gpu = accelerator
    precision = precision_for(target.name, base_model, quantization, gpu)
    if target.name == TORCH_TARGET and gpu is None and precision == "fp8":
        notes.append("fp8 on the CPU runs torch._scaled_mm's CPU kernel: for the accuracy figures, not for speed")
    if target.name == CPU_TARGET and quantization not in ("no_quant", "int8"):
        notes.append(f"quantization_type {quantization} applies to TensorRT engines; the CPU engine is fp32")
    max_input = spec.max_seq_len
    if max_input > max_num_tokens:
        notes.append(f"max input capped from {max_input} to max_num_tokens {max_num_tokens}: one input must fit one call")
        max_input = max_num_tokens
    profiles = derive_profiles(max_num_tokens, max_batch_size, max_input) if target.name == GPU_TARGET else []
    linears, params, hidden, intermediate = _linear_layers(spec)
    weight_bytes = BYTES_PER_WEIGHT[precision]
    activation_width = 2.0 if precision != "fp32" else 4.0
    largest = max((p.max_tokens for p in profiles), default=max_num_tokens)
    # a few hidden-sized buffers plus one intermediate-sized one per token live at once (layers reuse them)
    activation = int(largest * (6 * hidden + intermediate) * activation_width)
    return BuildPlan(
        target=target.name,
        target_reason=target.reason,
        precision=precision,
        gpu=gpu,
        compute_capability=capability,
        max_input_tokens=max_input,
        max_num_tokens=max_num_tokens,
        max_batch_size=max_batch_size,
        profiles=profiles,
        quantized_layers=_torch_fp8_layers(spec) if target.name == TORCH_TARGET and precision == "fp8"
        else quantized_layer_names(linears, _QTYPE.get(precision, "")),
        parameters=params,
        weights_bytes=int(params * weight_bytes),
        activation_bytes=activation,
        notes=notes,
    )
