"""The TensorRT build: (quantize) -> export the typed graph -> compile per profile -> verify on the
GPU -> write. Runs only where a CUDA GPU and TensorRT are present; every step it calls that does
not need them (plans, profiles, quantization and its accuracy, Q/DQ export) is tested on the CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from typing import TYPE_CHECKING, Any

from bei.checkpoint import Checkpoint
from bei.config import BeiConfig
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import TargetInfo
from bei.export import tensorrt as trt_target
from bei.export.onnx import export_onnx
from bei.export.plan import BuildPlan
from bei.export.verify import compare, require_agreement
from bei.modeling.module import build_module, input_names
from bei.modeling.spec import ModelSpec
from bei.progress import Progress
from bei.runtime.tokenizer import TokenizerRuntime

if TYPE_CHECKING:
    from bei.build import BuildResult

PLAN_FILE = "model.plan"
# agreement of an unquantized FP16/BF16 engine with the fp32 reference
MIN_COSINE = {"fp16": 0.999, "bf16": 0.995}
GRAPH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_gpu_engine(
    config: BeiConfig,
    checkpoint: Checkpoint,
    spec: ModelSpec,
    plan: BuildPlan,
    *,
    engines_root: Path,
    config_dir: Path,
    progress: Progress,
    started: float,
) -> BuildResult:
    from bei.build import manifest_for, reference_outputs, sample_batch, write_engine_files
    from bei.runtime.tensorrt import TensorRTBackend

    build = config.trt_llm.build
    tokenizer = TokenizerRuntime(checkpoint.path / "tokenizer.json", spec.max_seq_len, chat_template=spec.chat_template)
    quantization: dict[str, Any] | None = None
    with staged_engine_dir(engines_root / config.name) as staging:
        module = build_module(spec)
        sample = sample_batch(spec, tokenizer)
        reference = reference_outputs(module, sample)
        graph = staging / "graph.onnx"
        check_batch, check_reference = sample, reference
        if plan.precision in ("fp8", "nvfp4", "nvfp4-mlp"):
            from bei.export import quantize

            with progress.stage("quantize"):
                qcfg = build.quantization_config
                texts, max_len, check_batch = quantize.calibration_inputs(qcfg, spec, tokenizer, config_dir)
                module = module.to("cuda")  # calibration runs where the parameters are
                quantized = quantize.quantize_module(module, tokenizer, build.quantization_type.value, texts, max_len)
                accuracy = quantize.measure_accuracy(module, quantized, check_batch, spec.task)
                quantize.require_accuracy(accuracy, qcfg.min_accuracy)
                check_reference = reference_outputs(module.to("cpu"), check_batch)
                quantization = {"type": build.quantization_type.value, "calibration": qcfg.model_dump(), "accuracy": accuracy.as_dict()}
                progress.note(accuracy.summary())
            with progress.stage("export"):
                if plan.precision != "fp8":  # TensorRT's FP4 GEMMs take fp16 activations
                    quantized = quantized.half()
                quantize.export_qdq_onnx(quantized.to("cpu"), sample, graph)
        else:
            with progress.stage("export"):
                export_onnx(module.to(GRAPH_DTYPE[plan.precision]), sample, graph)
        with progress.stage("compile"):
            timing_cache = engines_root / trt_target.TIMING_CACHE_FILE
            (staging / PLAN_FILE).write_bytes(
                trt_target.build_plan(graph, input_names(spec), plan.profiles, timing_cache, note=progress.note)
            )
            for leftover in staging.glob("graph.onnx*"):
                leftover.unlink()
        with progress.stage("verify"):
            backend = TensorRTBackend(staging / PLAN_FILE, input_names(spec), _output_name(spec), plan.profiles)
            output = backend.infer(check_batch)
            if quantization is not None:
                from bei.export import quantize

                engine_accuracy = quantize.accuracy_of_outputs(check_reference, output, check_batch, spec.task)
                quantize.require_accuracy(engine_accuracy, quantization["accuracy"]["min_cosine"] - 0.005)
            agreement = compare(check_reference, output)
            if quantization is None:
                require_agreement(agreement, min_cosine=MIN_COSINE[plan.precision], max_abs_diff=float("inf"), what=f"the TensorRT {plan.precision} engine")
        with progress.stage("write"):
            manifest = manifest_for(
                config,
                checkpoint,
                spec,
                plan,
                agreement,
                graph_file=PLAN_FILE,
                target=TargetInfo(
                    name=trt_target.TARGET_NAME,
                    versions=trt_target.versions(),
                    gpu=plan.gpu,
                    compute_capability=plan.compute_capability,
                ),
                reference="transformers (torch, fp32, CPU)",
                build_seconds=time.perf_counter() - started,
                quantization=quantization,
            )
            write_engine_files(checkpoint, staging, manifest)
    from bei.build import BuildResult

    return BuildResult(engine_dir=(engines_root / config.name).resolve(), manifest=manifest)


def _output_name(spec: ModelSpec) -> str:
    from bei.modeling.module import OUTPUT_NAMES

    return OUTPUT_NAMES[spec.task]
