"""The GPU target: a TensorRT plan from the exported ONNX graph. The only module that calls the
TensorRT builder; what it consumes (graph, profiles, shapes) is plain code tested on the CPU.

The graph already carries its precision (strongly typed: FP16/BF16 weights from the export, or
explicit Q/DQ nodes for FP8/NVFP4), as TensorRT 11 requires; no precision flags are set here.
Verify on a GPU machine with the commands in docs/gpu.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bei.engine.profiles import Profile, profile_shapes
from bei.errors import ExportError

TIMING_CACHE_FILE = ".tensorrt-timing.cache"  # next to the engines, shared by every build on this GPU


def versions() -> dict[str, str]:
    import tensorrt as trt
    import torch

    return {"tensorrt": str(trt.__version__), "cuda": str(torch.version.cuda), "torch": torch.__version__}


def build_plan(
    graph: Path,
    input_names: list[str],
    profiles: list[Profile],
    timing_cache: Path,
    *,
    workspace_bytes: int | None = None,
    note: Callable[[str], None] = lambda _: None,
) -> bytes:
    """Parse `graph`, add one optimization profile per `profiles`, build; reuse and update the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # required on 10.x, the default on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {graph.name}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(profile, input_names).items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    note(f"building {len(profiles)} optimization profile(s); timing cache {timing_cache}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
