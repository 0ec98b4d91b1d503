"""The build pipeline: config -> checkpoint -> model spec -> plan -> the target's build -> engine dir.

What comes before the heavy work (choosing the target, resolving the checkpoint, reading its spec,
planning) is here; the heavy work is the chosen target's `build` (bei/targets/<name>/)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.plan import BuildPlan
from bei.checkpoint import GB, Checkpoint, RemoteLimits, check_required_files, resolve_checkpoint
from bei.config import BeiConfig, QuantizationType
from bei.errors import EngineError
from bei.hardware import Host, detect_host
from bei.modeling.detect import read_model_spec
from bei.modeling.spec import ModelSpec
from bei.progress import Progress
from bei.targets import registry
from bei.targets.plan import check_target_hardware, make_plan

__all__ = ["BuildResult", "build_engine", "plan_build"]


def resolve_config_checkpoint(config: BeiConfig, config_dir: Path, note: Callable[[str], None] | None) -> Checkpoint:
    """The config's checkpoint as a local folder (a REMOTE_URL tarball: from its cache, revalidated)."""
    repo = config.trt_llm.build.checkpoint_repository
    return resolve_checkpoint(
        repo.source.value,
        repo.repo,
        revision=repo.revision,
        secret_name=repo.runtime_secret_name,
        base_dir=config_dir,
        progress=note,
        limits=RemoteLimits(
            sha256=repo.sha256,
            max_download_bytes=int(repo.max_download_gb * GB),
            max_extracted_bytes=int(repo.max_extracted_gb * GB) if repo.max_extracted_gb is not None else None,
        ),
    )


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
    host = host or detect_host()
    cpu_precision = "fp32" if build.cpu_precision == "auto" else build.cpu_precision  # auto: see build_engine
    choice = registry.choose_target(target, host, dry_run=dry_run, cpu_precision=cpu_precision)
    # hardware rules before any download
    quantization = build.quantization_type.value
    check_target_hardware(choice, build.base_model.value, quantization, host, cpu_precision)
    chosen = registry.get(choice.name)
    progress = progress or Progress([])
    progress.stages = chosen.stages(quantization in chosen.quantizes)
    progress.note(f"target {choice.name}: {choice.reason}")

    with progress.stage("resolve checkpoint"):
        checkpoint = resolve_config_checkpoint(config, config_dir, progress.note)
        check_required_files(checkpoint.path)
        progress.note(f"{checkpoint.path}")

    with progress.stage("read pooling"):
        spec = read_model_spec(checkpoint.path, base_model=build.base_model.value, max_seq_len=build.max_seq_len, adapter=build.adapter)
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
            cpu_precision=cpu_precision,
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
    is left to load (and an engine built before stays as it was). A full disk, a name too long or a
    folder without write permission is an EngineError naming where."""
    try:
        return _build_engine(config, config_dir=config_dir, engines_root=engines_root, target=target, progress=progress, host=host)
    except OSError as error:
        raise _storage_error(error, engines_root / config.name) from error


def _storage_error(error: OSError, engine_dir: Path) -> OSError | EngineError:
    """The EngineError of an OSError the filesystem raised while writing an engine; other OSErrors as they are."""
    where = f"{error.filename}" if error.filename else f"{engine_dir}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return EngineError(f"no space left on the device (or over quota) while building {engine_dir}: free some space and build again")
    if error.errno == errno.ENAMETOOLONG:
        return EngineError(f"a file name is too long for the filesystem while building {engine_dir}: {where}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EngineError(f"cannot write the engine {engine_dir}: {error.strerror} ({where})")
    return error


def _build_engine(
    config: BeiConfig,
    *,
    config_dir: Path,
    engines_root: Path,
    target: str,
    progress: Progress | None,
    host: Host | None,
) -> BuildResult:
    progress = progress or Progress([])
    host = host or detect_host()
    if target == "auto" and host.gpu is None and config.trt_llm.build.cpu_precision == "auto":
        return build_fastest_cpu_engine(config, config_dir=config_dir, engines_root=engines_root, progress=progress, host=host)
    started = time.perf_counter()
    checkpoint, spec, plan = plan_build(config, config_dir=config_dir, target=target, progress=progress, host=host)
    if plan.max_input_tokens != spec.max_seq_len:
        spec = replace(spec, max_seq_len=plan.max_input_tokens)
    ctx = BuildContext(config, checkpoint, spec, plan, engines_root, config_dir, progress, started=started)
    return registry.get(plan.target).build(ctx)


# --- cpu_precision: auto --------------------------------------------------------------------
TIMING_SECONDS = 3.0  # per candidate, after one untimed pass over every batch
TIMING_BATCH = 32  # rows per call, as a client batch of the benchmark's size


@dataclass(frozen=True)
class Candidate:
    name: str  # "fp32" | "bf16" | "int8" (ONNX Runtime) | "int8+bf16" (the torch target's W8A8)
    cpu_precision: str
    quantization: str


def cpu_candidates(config: BeiConfig, host: Host) -> list[Candidate]:
    """The CPU engines `cpu_precision: auto` builds on `host`: fp32; bf16 where the CPU has bf16
    units; when the config allows int8 (`quantization_type` or `cpu_quantization` int8), ONNX
    Runtime's int8 and, where the CPU has bf16 units, the torch target's W8A8 with bf16 GEMMs for the
    layers int8 would make inaccurate."""
    build = config.trt_llm.build
    candidates = [Candidate("fp32", "fp32", "no_quant")]
    if host.bf16_units:
        candidates.append(Candidate("bf16", "bf16", "no_quant"))
    if "int8" in (build.quantization_type.value, build.cpu_quantization):
        candidates.append(Candidate("int8", "fp32", "int8"))
        if host.bf16_units:
            candidates.append(Candidate("int8+bf16", "bf16", "int8"))
    return candidates


def time_engine(engine_dir: Path, texts: list[str], seconds: float = TIMING_SECONDS) -> float:
    """Texts per second of the engine's backend on `texts` (batches of TIMING_BATCH, as served), over
    about `seconds` after one untimed pass."""
    from bei.backend import Batch
    from bei.targets.loading import load_engine

    engine = load_engine(engine_dir)
    try:
        encoded = [engine.tokenizer.encode(text, truncate=True) for text in texts]
        batches = [
            Batch.pad(encoded[i : i + TIMING_BATCH], engine.tokenizer.pad_id, engine.manifest.padding_side)
            for i in range(0, len(encoded), TIMING_BATCH)
        ]
        for batch in batches:  # every shape once, untimed (a compiled engine may compile per shape)
            engine.backend.infer(batch)
        done, started = 0, time.perf_counter()
        while True:
            for batch in batches:
                engine.backend.infer(batch)
                done += len(batch.lengths)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return done / elapsed
    finally:
        engine.backend.close()


SCRATCH_PREFIX = ".candidates-"


def remove_abandoned_scratch(engines_root: Path) -> None:
    """Scratch folders of candidate builds whose process is gone (killed mid-build)."""
    for folder in engines_root.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_fastest_cpu_engine(config: BeiConfig, *, config_dir: Path, engines_root: Path, progress: Progress, host: Host) -> BuildResult:
    """Build each of `cpu_candidates` (quietly, in a scratch folder), time each on held-out texts of
    about 100 tokens, keep the fastest that passed its accuracy gate, and write it as
    `engines_root/<config.name>` with every candidate's figures in its manifest (`selection`). The
    manifest keeps the config as given."""
    from bei.engine.layout import staged_engine_dir
    from bei.engine.manifest import CandidateInfo, read_manifest
    from bei.errors import BeiError, ExportError
    from bei.quantization.builtin_texts import heldout_texts

    started = time.perf_counter()
    candidates = cpu_candidates(config, host)
    timed = len(candidates) > 1  # one candidate (a CPU without bf16 units): nothing to choose between
    progress.stages = ["build candidates", *(["time candidates"] if timed else []), "write"]
    kept = " (the fastest verified one is kept)" if timed else ""
    progress.note("cpu_precision auto: " + ", ".join(c.name for c in candidates) + kept)
    engines_root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(engines_root)
    with tempfile.TemporaryDirectory(dir=engines_root, prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        built: dict[str, Path] = {}
        infos: dict[str, CandidateInfo] = {}
        with progress.stage("build candidates"):
            for candidate in candidates:
                fixed_build = config.trt_llm.build.model_copy(
                    update={"cpu_precision": candidate.cpu_precision, "quantization_type": QuantizationType(candidate.quantization)}
                )
                fixed = config.model_copy(update={"trt_llm": config.trt_llm.model_copy(update={"build": fixed_build})})
                try:
                    result = build_engine(fixed, config_dir=config_dir, engines_root=Path(scratch) / candidate.name,
                                          progress=Progress([], enabled=False), host=host)  # fmt: skip
                except BeiError as err:
                    infos[candidate.name] = CandidateInfo(target="?", precision=candidate.name, error=err.message)
                    progress.note(f"{candidate.name}: dropped: {err.message}")
                    continue
                built[candidate.name] = result.engine_dir
                manifest = result.manifest
                accuracy = (manifest.quantization or {}).get("accuracy", {}).get("min_cosine")
                infos[candidate.name] = CandidateInfo(
                    target=manifest.target.name, precision=candidate.name,
                    min_cosine=accuracy if accuracy is not None else manifest.verification.min_cosine,
                )  # fmt: skip
                progress.note(f"{candidate.name}: {manifest.target.name}, cosine {infos[candidate.name].min_cosine:.5f}")
        if not built:
            reasons = "; ".join(f"{info.precision}: {info.error}" for info in infos.values())
            raise ExportError(f"cpu_precision auto: no candidate engine passed its checks: {reasons}")
        if timed:
            with progress.stage("time candidates"):
                sentences = heldout_texts(320)  # five to a text: ~100-token inputs, as embedding requests often are
                texts = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
                for precision, folder in built.items():
                    infos[precision] = infos[precision].model_copy(update={"texts_per_s": round(time_engine(folder, texts), 1)})
                    progress.note(f"{precision}: {infos[precision].texts_per_s} texts/s")
        fastest = max(built, key=lambda p: infos[p].texts_per_s or 0.0)
        infos[fastest] = infos[fastest].model_copy(update={"chosen": True})
        with progress.stage("write"), staged_engine_dir(engines_root / config.name) as staging:
            shutil.copytree(built[fastest], staging, dirs_exist_ok=True)
            manifest = read_manifest(staging).model_copy(
                update={
                    "config": config.model_dump(mode="json"),
                    "config_fingerprint": config.fingerprint(),
                    "selection": [infos[c.name] for c in candidates],
                    "build_seconds": round(time.perf_counter() - started, 2),
                }
            )
            manifest.write(staging)
            progress.note(f"kept {fastest} ({infos[fastest].texts_per_s} texts/s)")
    return BuildResult(engine_dir=(engines_root / config.name).resolve(), manifest=manifest)
