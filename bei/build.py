"""The build pipeline: config -> checkpoint -> model spec -> export -> optimize -> verify -> engine dir."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bei import __version__
from bei.checkpoint import Checkpoint, check_required_files, resolve_checkpoint
from bei.config import BeiConfig
from bei.engine.compat import Host, detect_host
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import Manifest, PoolingInfo, SourceInfo, TargetInfo, VerificationInfo
from bei.export import onnxruntime as ort_target
from bei.export.onnx import export_onnx
from bei.export.plan import CPU_TARGET, GPU_TARGET, TORCH_TARGET, BuildPlan, check_target_hardware, choose_target, make_plan
from bei.export.verify import Agreement, compare, require_agreement
from bei.modeling.detect import read_model_spec
from bei.modeling.module import OUTPUT_NAMES, EngineModule, build_module, input_names
from bei.modeling.spec import ModelSpec, Task
from bei.progress import Progress
from bei.runtime.base import Batch
from bei.runtime.onnxruntime import OnnxRuntimeBackend
from bei.runtime.tokenizer import Encoded, TokenizerRuntime

STAGES = ["resolve checkpoint", "read pooling", "export", "optimize", "verify", "write"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)
GRAPH_FILE = "model.onnx"

# sample inputs of unequal length: exported and verified with padding in every batch
SAMPLE_TEXTS = (
    "Hello world.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "A",
    "Engines are compiled once and served many times; verification compares them with the reference.",
)
SAMPLE_PAIRS = tuple(zip(SAMPLE_TEXTS, reversed(SAMPLE_TEXTS)))

# fp32 CPU engines must agree with the torch reference this closely, or the build fails
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 2e-3


@dataclass(frozen=True)
class BuildResult:
    engine_dir: Path
    manifest: Manifest


def stages_for(target: str, quantized: bool) -> list[str]:
    if target == TORCH_TARGET:
        return ["resolve checkpoint", "read pooling", "load"] + (["quantize"] if quantized else []) + ["verify", "compile", "write"]
    if target == GPU_TARGET:
        return ["resolve checkpoint", "read pooling"] + (["quantize"] if quantized else []) + [
            "export",
            "compile",
            "verify",
            "write",
        ]
    return STAGES[:-1] + (["quantize"] if quantized else []) + STAGES[-1:]  # int8 runs after verify, before write


def sample_batch(spec: ModelSpec, tokenizer: TokenizerRuntime) -> Batch:
    items: list[str | tuple[str, str]] = list(SAMPLE_PAIRS if spec.task in (Task.RERANK, Task.CLASSIFY) else SAMPLE_TEXTS)
    encoded: list[Encoded] = []
    for i, item in enumerate(items):
        prompt = "query: " if (spec.pooling and not spec.pooling.include_prompt and i % 2 == 0) else None
        encoded.append(tokenizer.encode(item, truncate=True, prompt=prompt))
    return Batch.pad(encoded, tokenizer.pad_id, spec.padding_side)


def reference_outputs(module: EngineModule, batch: Batch) -> np.ndarray:
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds(input_names(module.spec)).items()}
    with torch.no_grad():
        return module(**feeds).float().numpy()


def plan_build(
    config: BeiConfig,
    *,
    config_dir: Path,
    target: str = "auto",
    progress: Progress | None = None,
    host: Host | None = None,
    dry_run: bool = False,
) -> tuple[Checkpoint, ModelSpec, BuildPlan]:
    """Everything decided before the heavy work; `bei build --dry-run` stops here."""
    build = config.trt_llm.build
    repo = build.checkpoint_repository
    host = host or detect_host()
    choice = choose_target(target, host, dry_run=dry_run)
    # hardware rules before any download
    check_target_hardware(choice, build.base_model.value, build.quantization_type.value, host)
    progress = progress or Progress(stages_for(choice.name, False))
    quantized = build.quantization_type.value == "int8" if choice.name == CPU_TARGET else build.quantization_type.value != "no_quant"
    progress.stages = stages_for(choice.name, quantized)
    progress.note(f"target {choice.name}: {choice.reason}")

    with progress.stage("resolve checkpoint"):
        checkpoint: Checkpoint = resolve_checkpoint(
            repo.source.value,
            repo.repo,
            revision=repo.revision,
            secret_name=repo.runtime_secret_name,
            base_dir=config_dir,
            progress=progress.note,
        )
        check_required_files(checkpoint.path)
        progress.note(f"{checkpoint.path}")

    with progress.stage("read pooling"):
        spec = read_model_spec(checkpoint.path, base_model=build.base_model.value, max_seq_len=build.max_seq_len)
        pooling = spec.pooling.name if spec.pooling else "none"
        progress.note(f"{spec.architecture}: task {spec.task.value}, pooling {pooling}, normalize {spec.normalize}")
        plan = make_plan(
            spec,
            target=choice,
            base_model=build.base_model.value,
            quantization=build.quantization_type.value,
            max_num_tokens=build.max_num_tokens,
            max_batch_size=build.max_batch_size,
            accelerator=config.resources.accelerator,
            host=host,
        )
        for line in plan.notes:
            progress.note(line)
    return checkpoint, spec, plan


def build_engine(
    config: BeiConfig,
    *,
    config_dir: Path,
    engines_root: Path,
    target: str = "auto",
    progress: Progress | None = None,
    host: Host | None = None,
) -> BuildResult:
    """Build `engines_root/<config.name>` atomically; on any failure nothing is left to load."""
    started = time.perf_counter()
    progress = progress or Progress(STAGES)
    checkpoint, spec, plan = plan_build(config, config_dir=config_dir, target=target, progress=progress, host=host)
    if plan.max_input_tokens != spec.max_seq_len:
        spec = replace(spec, max_seq_len=plan.max_input_tokens)
    if plan.target in (GPU_TARGET, TORCH_TARGET):
        if plan.target == GPU_TARGET:
            from bei.export.gpu_build import build_gpu_engine as build_target
        else:
            from bei.export.torch_target import build_torch_engine as build_target
        return build_target(
            config, checkpoint, spec, plan, engines_root=engines_root, config_dir=config_dir, progress=progress, started=started
        )
    tokenizer = TokenizerRuntime(checkpoint.path / "tokenizer.json", spec.max_seq_len, chat_template=spec.chat_template)

    engine_dir = engines_root / config.name
    with staged_engine_dir(engine_dir) as staging:
        with progress.stage("export"):
            module = build_module(spec)
            sample = sample_batch(spec, tokenizer)
            reference = reference_outputs(module, sample)  # before export: exporters may alter the module
            raw_graph = staging / "exported.onnx"
            export_onnx(module, sample, raw_graph)
            del module

        with progress.stage("optimize"):
            fused = ort_target.optimize(spec, raw_graph, staging / GRAPH_FILE, note=progress.note)
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
        if plan.precision == "int8":
            with progress.stage("quantize"):
                quantization = _quantize_int8(config, config_dir, spec, tokenizer, staging / GRAPH_FILE, progress)

        with progress.stage("write"):
            manifest = manifest_for(
                config,
                checkpoint,
                spec,
                plan,
                agreement,
                graph_file=GRAPH_FILE,
                target=TargetInfo(name=plan.target, versions=ort_target.versions()),
                reference="transformers (torch, fp32)",
                build_seconds=time.perf_counter() - started,
                quantization=quantization,
            )
            write_engine_files(checkpoint, staging, manifest)
    return BuildResult(engine_dir=engine_dir.resolve(), manifest=manifest)


def _quantize_int8(
    config: BeiConfig, config_dir: Path, spec: ModelSpec, tokenizer: TokenizerRuntime, graph: Path, progress: Progress
) -> dict[str, Any]:
    """Replace the verified fp32 `graph` by its int8 version, gated on held-out texts against it."""
    from bei.export import calibration, quantize
    from bei.export.int8 import quantize_int8

    qcfg = config.trt_llm.build.quantization_config
    max_len = min(qcfg.calib_max_seq_length, spec.max_seq_len)
    heldout = quantize.heldout_batch(spec, tokenizer, calibration.builtin_texts(qcfg.calib_size), max_len)
    int8 = graph.with_name("model.int8.onnx")
    entry = quantize_int8(spec, graph, int8, heldout, qcfg.min_accuracy, note=progress.note)
    for old in graph.parent.glob(graph.name + "*"):
        old.unlink()
    int8.rename(graph)
    return entry


def manifest_for(
    config: BeiConfig,
    checkpoint: Checkpoint,
    spec: ModelSpec,
    plan: BuildPlan,
    agreement: Agreement,
    *,
    graph_file: str,
    target: TargetInfo,
    reference: str,
    build_seconds: float,
    quantization: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of an engine of any target."""
    build = config.trt_llm.build
    default_route = config.trt_llm.runtime.webserver_default_route
    return Manifest(
        bei_version=__version__,
        name=config.name,
        source=SourceInfo(
            source=checkpoint.source,
            repo=checkpoint.repo,
            revision=checkpoint.revision,
            file_hashes=checkpoint.file_hashes(),
        ),
        task=spec.task.value,
        architecture=spec.architecture,
        model_type=spec.model_type,
        base_model=spec.base_model,
        pooling=PoolingInfo(modes=[m.value for m in spec.pooling.modes], include_prompt=spec.pooling.include_prompt)
        if spec.pooling
        else None,
        normalize=spec.normalize,
        embedding_dim=spec.embedding_dim,
        labels=list(spec.labels),
        max_input_tokens=spec.max_seq_len,
        max_num_tokens=build.max_num_tokens,
        max_batch_size=build.max_batch_size,
        padding_side=spec.padding_side,
        prompts=spec.prompts,
        default_prompt_name=spec.default_prompt_name,
        chat_template=spec.chat_template,
        default_route=default_route.value if default_route else None,
        precision=plan.precision,
        target=target,
        graph_file=graph_file,
        graph_inputs=input_names(spec),
        graph_output=OUTPUT_NAMES[spec.task],
        build_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(build_seconds, 2),
        verification=VerificationInfo(
            reference=reference,
            samples=agreement.samples,
            max_abs_diff=agreement.max_abs_diff,
            min_cosine=agreement.min_cosine,
        ),
        config=config.model_dump(mode="json"),
        config_fingerprint=config.fingerprint(),
        profiles=[p.as_dict() for p in plan.profiles],
        dense_layers=[
            {"in_features": d.in_features, "out_features": d.out_features, "bias": d.bias, "activation": d.activation}
            for d in spec.dense
        ],
        quantization=quantization,
    )


def write_engine_files(checkpoint: Checkpoint, staging: Path, manifest: Manifest) -> None:
    """Tokenizer and reference files, then the manifest, last: a folder without one is never loaded."""
    for name in TOKENIZER_FILES:
        if (checkpoint.path / name).exists():
            shutil.copy2(checkpoint.path / name, staging / name)
    manifest.write(staging)
