"""Can this machine run an engine? CPU engines need the runtime; GPU engines the same GPU and TensorRT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bei.engine.manifest import Manifest
from bei.errors import EngineError


@dataclass(frozen=True)
class Host:
    """What this machine offers: runtime versions by name, and the GPU if any."""

    versions: dict[str, str]
    gpu: str | None = None
    compute_capability: str | None = None


def detect_host(gpu: bool = True) -> Host:
    """Runtimes present; with `gpu`, also the CUDA GPU (this imports torch)."""
    versions: dict[str, str] = {}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import tensorrt  # type: ignore[import-not-found]

        versions["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        pass
    name = capability = None
    if not gpu:
        return Host(versions=versions)
    try:
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            capability = f"{major}.{minor}"
    except ImportError:
        pass
    return Host(versions=versions, gpu=name, compute_capability=capability)


def _check_cpu(manifest: Manifest, host: Host) -> None:
    if "onnxruntime" not in host.versions:
        raise EngineError(f"engine {manifest.name!r} needs onnxruntime, which is not installed")


def _check_gpu(manifest: Manifest, host: Host) -> None:
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


def _check_torch(manifest: Manifest, host: Host) -> None:
    """A torch engine built on the CPU runs wherever torch does; one built on a GPU needs that GPU type
    (its compiled code and FP8 kernels are per GPU); another torch version only recompiles."""
    if "torch" not in host.versions:
        raise EngineError(f"engine {manifest.name!r} needs torch, which is not installed")
    built_gpu = manifest.target.gpu
    if built_gpu is None:
        return
    rebuild = "rebuild it on this machine with `bei build <config.yaml> --target torch`"
    if host.gpu is None:
        raise EngineError(f"engine {manifest.name!r} was built for the GPU {built_gpu} and this machine has no GPU; {rebuild}")
    if host.gpu != built_gpu:
        raise EngineError(f"engine {manifest.name!r} was built for {built_gpu}, not for this machine's {host.gpu}; {rebuild}")


CHECKS: dict[str, Callable[[Manifest, Host], None]] = {
    "onnxruntime-cpu": _check_cpu,
    "tensorrt": _check_gpu,
    "torch": _check_torch,
}


def check_compatible(manifest: Manifest, host: Host | None = None) -> None:
    """Raise an EngineError saying why this machine cannot run the engine."""
    check = CHECKS.get(manifest.target.name)
    if check is None:
        raise EngineError(f"engine {manifest.name!r} has unknown target {manifest.target.name!r}; known: {', '.join(CHECKS)}")
    check(manifest, host or detect_host(gpu=manifest.target.name != "onnxruntime-cpu"))
