"""The TensorRT build: (quantize) -> export the typed graph -> compile per profile -> verify on the
GPU -> write. Runs only where a CUDA GPU and TensorRT are present; every step it calls that does
not need them (plans, profiles, quantization and its accuracy, Q/DQ export) is tested on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from bei.accuracy import accuracy_of_outputs, compare, require_accuracy, require_agreement
from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.manifest import write_engine
from bei.buildsteps.samples import reference_outputs, sample_batch
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import TargetInfo
from bei.modeling.module import OUTPUT_NAMES, build_module, input_names
from bei.modeling.onnx_export import export_onnx
from bei.targets.tensorrt import compile as trt_compile
from bei.targets.tensorrt.backend import TensorRTBackend

PLAN_FILE = "model.plan"
# agreement of an unquantized FP16/BF16 engine with the fp32 reference
MIN_COSINE = {"fp16": 0.999, "bf16": 0.995}
GRAPH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(ctx: BuildContext) -> BuildResult:
    spec, plan, progress = ctx.spec, ctx.plan, ctx.progress
    build_config = ctx.config.trt_llm.build
    tokenizer = ctx.tokenizer
    quantization: dict[str, Any] | None = None
    with staged_engine_dir(ctx.engine_dir) as staging:
        module = build_module(spec)
        sample = sample_batch(spec, tokenizer)
        reference = reference_outputs(module, sample)
        graph = staging / "graph.onnx"
        check_batch, check_reference = sample, reference
        if plan.precision in ("fp8", "nvfp4", "nvfp4-mlp"):
            from bei.quantization import calibration, modelopt, qdq

            with progress.stage("quantize"):
                qcfg = build_config.quantization_config
                texts, max_len, check_batch = calibration.calibration_inputs(qcfg, spec, tokenizer, ctx.config_dir)
                module = module.to("cuda")  # calibration runs where the parameters are
                quantized = modelopt.quantize_module(module, tokenizer, build_config.quantization_type.value, texts, max_len)
                accuracy = modelopt.measure_accuracy(module, quantized, check_batch, spec.task)
                require_accuracy(accuracy, qcfg.min_accuracy)
                check_reference = reference_outputs(module.to("cpu"), check_batch)
                quantization = {
                    "type": build_config.quantization_type.value,
                    "calibration": qcfg.model_dump(),
                    "accuracy": accuracy.as_dict(),
                }
                progress.note(accuracy.summary())
            with progress.stage("export"):
                if plan.precision != "fp8":  # TensorRT's FP4 GEMMs take fp16 activations
                    quantized = quantized.half()
                qdq.export_qdq_onnx(quantized.to("cpu"), sample, graph)
        else:
            with progress.stage("export"):
                export_onnx(module.to(GRAPH_DTYPE[plan.precision]), sample, graph)
        with progress.stage("compile"):
            timing_cache = ctx.engines_root / trt_compile.TIMING_CACHE_FILE
            (staging / PLAN_FILE).write_bytes(
                trt_compile.build_plan(graph, input_names(spec), plan.profiles, timing_cache, note=progress.note)
            )
            for leftover in staging.glob("graph.onnx*"):
                leftover.unlink()
        with progress.stage("verify"):
            backend = TensorRTBackend(staging / PLAN_FILE, input_names(spec), OUTPUT_NAMES[spec.task], plan.profiles)
            output = backend.infer(check_batch)
            if quantization is not None:
                engine_accuracy = accuracy_of_outputs(check_reference, output, check_batch, spec.task)
                require_accuracy(engine_accuracy, quantization["accuracy"]["min_cosine"] - 0.005)
            agreement = compare(check_reference, output)
            if quantization is None:
                require_agreement(agreement, min_cosine=MIN_COSINE[plan.precision], max_abs_diff=float("inf"),
                                  what=f"the TensorRT {plan.precision} engine")  # fmt: skip
        return write_engine(
            ctx,
            staging,
            agreement,
            graph_file=PLAN_FILE,
            target=TargetInfo(
                name=plan.target,
                versions=trt_compile.versions(),
                gpu=plan.gpu,
                compute_capability=plan.compute_capability,
                device="cuda",
            ),
            reference="transformers (torch, fp32, CPU)",
            quantization=quantization,
        )
