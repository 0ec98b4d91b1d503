"""The build pipeline: config -> checkpoint -> model spec -> plan -> the target's build -> engine dir.

What comes before the heavy work (choosing the target, resolving the checkpoint, reading its spec,
planning) is here; the heavy work is the chosen target's `build` (bei/targets/<name>/)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.plan import BuildPlan
from bei.checkpoint import Checkpoint, check_required_files, resolve_checkpoint
from bei.config import BeiConfig
from bei.hardware import Host, detect_host
from bei.modeling.detect import read_model_spec
from bei.modeling.spec import ModelSpec
from bei.progress import Progress
from bei.targets import registry
from bei.targets.plan import check_target_hardware, make_plan

__all__ = ["BuildResult", "build_engine", "plan_build"]


def plan_build(
    config: BeiConfig,
    *,
    config_dir: Path,
    target: str = "auto",
    progress: Progress | None = None,
    host: Host | None = None,
    dry_run: bool = False,
) -> tuple[Checkpoint, ModelSpec, BuildPlan]:
    """Everything decided before the heavy work; `bei build --dry-run` stops here. Sets `progress`'s
    stages to the chosen target's."""
    build = config.trt_llm.build
    repo = build.checkpoint_repository
    host = host or detect_host()
    choice = registry.choose_target(target, host, dry_run=dry_run, cpu_precision=build.cpu_precision)
    # hardware rules before any download
    quantization = build.quantization_type.value
    check_target_hardware(choice, build.base_model.value, quantization, host, build.cpu_precision)
    chosen = registry.get(choice.name)
    progress = progress or Progress([])
    progress.stages = chosen.stages(quantization in chosen.quantizes)
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
            quantization=quantization,
            max_num_tokens=build.max_num_tokens,
            max_batch_size=build.max_batch_size,
            accelerator=config.resources.accelerator,
            host=host,
            cpu_precision=build.cpu_precision,
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
    """Build `engines_root/<config.name>` atomically with the chosen target; on any failure nothing
    is left to load."""
    progress = progress or Progress([])
    started = time.perf_counter()
    checkpoint, spec, plan = plan_build(config, config_dir=config_dir, target=target, progress=progress, host=host)
    if plan.max_input_tokens != spec.max_seq_len:
        spec = replace(spec, max_seq_len=plan.max_input_tokens)
    ctx = BuildContext(config, checkpoint, spec, plan, engines_root, config_dir, progress, started=started)
    return registry.get(plan.target).build(ctx)
