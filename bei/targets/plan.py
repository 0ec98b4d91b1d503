"""Make the plan of a build: the chosen target's details (precision, profiles, quantized layers)
plus what every plan has (input cap, parameter count, memory estimate). No GPU is needed."""

from __future__ import annotations

from dataclasses import dataclass

from bei.buildsteps.plan import BuildPlan, TargetChoice
from bei.errors import ConfigError
from bei.hardware import Capability, Host, compute_capability, hardware_problems
from bei.modeling.spec import ModelSpec
from bei.targets import registry
from bei.targets.base import PlanRequest


def check_target_hardware(target: TargetChoice, base_model: str, quantization: str, host: Host, cpu_precision: str = "fp32") -> None:
    """The target must accept the config's quantization and cpu_precision, and the hardware present
    run them (the config's own accelerator was checked at load)."""
    chosen = registry.get(target.name)
    if cpu_precision not in chosen.cpu_precisions:
        able = " and ".join(other.name for other in registry.TARGETS if cpu_precision in other.cpu_precisions) or "no target"
        raise ConfigError(f"trt_llm.build.cpu_precision: {cpu_precision!r} is built by target {able}, not by {chosen.name} (--target)")
    if cpu_precision == "bf16" and host.gpu is None and not host.bf16_units:
        raise ConfigError(
            "trt_llm.build.cpu_precision: 'bf16' needs a CPU with bf16 units (avx512_bf16 or amx_bf16), which this "
            "machine's CPU lacks (bf16 would be emulated, slower than fp32); use cpu_precision fp32 here"
        )
    if quantization not in chosen.quantizations:
        builders = [t for t in registry.TARGETS if quantization in t.quantizes]
        by = " and ".join(t.label for t in builders) or "no target"
        raise ConfigError(
            f"trt_llm.build.quantization_type: {quantization!r} is built for {by} only, not for target {chosen.name}; "
            f"target {chosen.name} builds {', '.join(sorted(chosen.quantizations))}"
        )
    if not chosen.uses_gpu or host.gpu is None:
        return
    cap: Capability | None = (
        (int(host.compute_capability.split(".")[0]), int(host.compute_capability.split(".")[1]))
        if host.compute_capability
        else compute_capability(host.gpu)
    )
    problems = hardware_problems(base_model, quantization, cap, f"this machine's {host.gpu}")
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    hidden: int
    intermediate: int


def model_size(spec: ModelSpec) -> ModelSize:
    """Parameter count, hidden and intermediate sizes, without loading weights."""
    import torch

    from bei.modeling.module import auto_class, transformers_config

    config = transformers_config(spec)
    with torch.device("meta"):
        model = auto_class(spec.task).from_config(config)
    params = sum(p.numel() for p in model.parameters())
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "hidden_dim", 0) or 4 * spec.hidden_size)
    return ModelSize(params, spec.hidden_size, intermediate)


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
    cpu_precision: str = "fp32",
) -> BuildPlan:
    chosen = registry.get(target.name)
    notes: list[str] = []
    gpu = host.gpu if chosen.uses_gpu else None
    capability = host.compute_capability if gpu else None
    if gpu is None and accelerator and chosen.uses_gpu and chosen.plannable:  # a plan made away from the GPU
        cap = compute_capability(accelerator)
        capability = f"{cap[0]}.{cap[1]}" if cap else None
        gpu = accelerator
    max_input = spec.max_seq_len
    if max_input > max_num_tokens:
        notes.append(f"max input capped from {max_input} to max_num_tokens {max_num_tokens}: one input must fit one call")
        max_input = max_num_tokens
    details = chosen.plan(
        PlanRequest(spec, base_model, quantization, max_num_tokens, max_batch_size, max_input, gpu, cpu_precision, host.cpu_features)
    )
    size = model_size(spec)
    activation_width = 4.0 if details.precision == "fp32" else 2.0
    largest = max((p.max_tokens for p in details.profiles), default=max_num_tokens)
    # a few hidden-sized buffers plus one intermediate-sized one per token live at once (layers reuse them)
    activation = int(largest * (6 * size.hidden + size.intermediate) * activation_width)
    return BuildPlan(
        target=chosen.name,
        target_reason=target.reason,
        precision=details.precision,
        gpu=gpu,
        compute_capability=capability,
        max_input_tokens=max_input,
        max_num_tokens=max_num_tokens,
        max_batch_size=max_batch_size,
        profiles=details.profiles,
        quantized_layers=details.quantized_layers,
        parameters=size.parameters,
        weights_bytes=int(size.parameters * details.precision.bytes_per_weight),
        activation_bytes=activation,
        notes=details.notes + notes,
        cpu_features=details.cpu_features,
    )
