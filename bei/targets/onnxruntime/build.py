"""The ONNX Runtime CPU build: export one graph (transformer + pooling + head), fuse it for ONNX
Runtime, verify it against the fp32 reference, optionally replace it by its gated int8 version, write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bei.accuracy import compare, require_agreement
from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.manifest import write_engine
from bei.buildsteps.samples import reference_outputs, sample_batch
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import TargetInfo
from bei.modeling.module import build_module, input_names
from bei.modeling.onnx_export import export_onnx
from bei.targets.onnxruntime import fusions
from bei.targets.onnxruntime.backend import OnnxRuntimeBackend

GRAPH_FILE = "model.onnx"
# fp32 CPU engines must agree with the torch reference this closely, or the build fails
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 2e-3


def build(ctx: BuildContext) -> BuildResult:
    """Build `ctx.engine_dir` atomically; on any failure nothing is left to load."""
    spec, progress = ctx.spec, ctx.progress
    with staged_engine_dir(ctx.engine_dir) as staging:
        with progress.stage("export"):
            module = build_module(spec)
            sample = sample_batch(spec, ctx.tokenizer)
            reference = reference_outputs(module, sample)  # before export: exporters may alter the module
            raw_graph = staging / "exported.onnx"
            export_onnx(module, sample, raw_graph)
            del module

        with progress.stage("optimize"):
            fused = fusions.optimize(spec, raw_graph, staging / GRAPH_FILE, note=progress.note)
            for leftover in staging.glob("exported.onnx*"):
                leftover.unlink()
            progress.note("fused: " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "none"))

        with progress.stage("verify"):
            backend = OnnxRuntimeBackend(staging / GRAPH_FILE, input_names(spec))
            agreement = compare(reference, backend.infer(sample))
            backend.close()
            require_agreement(agreement, min_cosine=MIN_COSINE, max_abs_diff=MAX_ABS_DIFF, what="the ONNX Runtime engine")
            progress.note(f"cosine {agreement.min_cosine:.7f}, max abs diff {agreement.max_abs_diff:.1e}")

        quantization = None
        if ctx.plan.precision == "int8":
            with progress.stage("quantize"):
                quantization = _quantize_int8(ctx, staging / GRAPH_FILE)

        return write_engine(
            ctx,
            staging,
            agreement,
            graph_file=GRAPH_FILE,
            target=TargetInfo(name=ctx.plan.target, versions=fusions.versions()),
            reference="transformers (torch, fp32)",
            quantization=quantization,
        )


def _quantize_int8(ctx: BuildContext, graph: Path) -> dict[str, Any]:
    """Replace the verified fp32 `graph` by its int8 version, gated on held-out texts against it."""
    from bei.quantization.calibration import builtin_heldout_batch
    from bei.targets.onnxruntime.int8 import quantize_int8

    qcfg = ctx.config.trt_llm.build.quantization_config
    heldout = builtin_heldout_batch(qcfg, ctx.spec, ctx.tokenizer)
    int8 = graph.with_name("model.int8.onnx")
    entry = quantize_int8(ctx.spec, graph, int8, heldout, qcfg.min_accuracy, note=ctx.progress.note)
    for old in graph.parent.glob(graph.name + "*"):
        old.unlink()
    int8.rename(graph)
    return entry
