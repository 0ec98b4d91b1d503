"""What this machine offers (`Host`: runtimes, the GPU) and the rules that tie precision to hardware:
one table, used by the config check (`resources.accelerator`) and by the build (the GPU present)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

Capability = tuple[int, int]

# Compute capability (major, minor) per accelerator family name.
COMPUTE_CAPABILITY: dict[str, Capability] = {
    "T4": (7, 5), "V100": (7, 0), "A10": (8, 6), "A10G": (8, 6), "A100": (8, 0),
    "L4": (8, 9), "L40": (8, 9), "L40S": (8, 9), "H100": (9, 0), "H100MIG": (9, 0),
    "H200": (9, 0), "B200": (10, 0), "GB200": (10, 0),
}  # fmt: skip

# Minimum compute capability per quantization type (only those that need one).
MIN_CAPABILITY: dict[str, Capability] = {"fp8": (8, 9), "fp4": (10, 0), "fp4_mlp_only": (10, 0)}

# Causal (`encoder`) models need BF16 and flash attention: Ampere or newer (not T4, not V100).
CAUSAL_MIN_CAPABILITY: Capability = (8, 0)


def compute_capability(accelerator: str) -> Capability | None:
    """Compute capability of "H100", "h100:2", "H100_40GB" or "NVIDIA H100 80GB HBM3"; None if unknown."""
    name = accelerator.split(":", 1)[0].strip().upper().replace("-", "_").replace(" ", "_")
    if name.startswith("NVIDIA_"):
        name = name[len("NVIDIA_") :]
    return COMPUTE_CAPABILITY.get(name) or COMPUTE_CAPABILITY.get(name.split("_", 1)[0])


def hardware_problems(base_model: str, quantization: str, capability: Capability | None, what: str) -> list[str]:
    """Why `what` (e.g. "resources.accelerator 'A100'") cannot run this build; [] when it can or is unknown."""
    if capability is None:
        return []
    have = f"{capability[0]}.{capability[1]}"
    problems = []
    need = MIN_CAPABILITY.get(quantization)
    if need is not None and capability < need:
        problems.append(
            f"trt_llm.build.quantization_type: {quantization!r} needs compute capability >= {need[0]}.{need[1]}; {what} has {have}"
        )
    if base_model == "encoder" and capability < CAUSAL_MIN_CAPABILITY:
        problems.append(
            f"trt_llm.build.base_model: 'encoder' (causal models) needs compute capability >= "
            f"{CAUSAL_MIN_CAPABILITY[0]}.{CAUSAL_MIN_CAPABILITY[1]} (not T4 or V100); {what} has {have}"
        )
    return problems


# CPU instruction sets with bf16 GEMM units (oneDNN runs bf16 matmuls on them at about twice the
# fp32 rate); elsewhere bf16 is emulated, slower than fp32
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set flags (`avx512_bf16`, `amx_bf16`, `avx2`, ...); empty where the
    kernel does not say (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_units(features: Iterable[str]) -> list[str]:
    """Which of `features` are bf16 GEMM units (best first); [] where bf16 would be emulated."""
    present = set(features)
    return [f for f in BF16_CPU_FEATURES if f in present]


@dataclass(frozen=True)
class Host:
    """What this machine offers: runtime versions by name, the GPU if any, the CPU's ISA features."""

    versions: dict[str, str]
    gpu: str | None = None
    compute_capability: str | None = None
    cpu_features: frozenset[str] = frozenset()

    @property
    def bf16_units(self) -> list[str]:
        return bf16_units(self.cpu_features)


def detect_host(gpu: bool = True) -> Host:
    """Runtimes present; with `gpu`, also the CUDA GPU (this imports torch)."""
    versions: dict[str, str] = {}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import tensorrt

        versions["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        pass
    name = capability = None
    if not gpu:
        return Host(versions=versions, cpu_features=cpu_features())
    try:
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            capability = f"{major}.{minor}"
    except ImportError:
        pass
    return Host(versions=versions, gpu=name, compute_capability=capability, cpu_features=cpu_features())
