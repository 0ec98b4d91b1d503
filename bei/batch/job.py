"""A batch job on this machine (`bei embed --engine`, `bei rerank --engine`): plan the parts, skip the finished
ones, compute and write the rest."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bei.batch.embedder import Embedder
from bei.batch.faults import maybe_exit
from bei.batch.meter import Meter
from bei.batch.options import DEFAULT_CHUNK, RUNTIME_ONLY, EmbedOptions, RerankOptions
from bei.batch.parts import done_parts, prepare_output, write_part
from bei.batch.scorer import Scorer
from bei.batch.sources import Fields, Part, id_type, input_files, plan_parts, read_part
from bei.batch.worker import Worker
from bei.engine.manifest import read_manifest
from bei.errors import ValidationError


@dataclass(frozen=True)
class JobSpec:
    engine: Path
    input: Path
    output: Path
    chunk_size: int = DEFAULT_CHUNK
    fields: Fields = field(default_factory=Fields)
    options: EmbedOptions | RerankOptions = field(default_factory=EmbedOptions)  # what the job computes: vectors or scores
    overwrite: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class Plan:
    parts: list[Part]
    todo: list[Part]
    id_type: Any  # pyarrow type of the id column; None: no id column
    total: int


def _record(spec: JobSpec, files: list[Path]) -> dict[str, Any]:
    """What makes two runs the same job: a rerun with this record resumes, another record is refused."""
    manifest = read_manifest(spec.engine)
    options = {k: v for k, v in asdict(spec.options).items() if k not in RUNTIME_ONLY}
    if not options.get("sparse", True):  # the record of a job without --sparse stays as it was: its outputs resume
        del options["sparse"]
    record: dict[str, Any] = {
        "input": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files],
        "chunk_size": spec.chunk_size,
        "fields": asdict(spec.fields),
        "engine": {"name": manifest.name, "config_fingerprint": manifest.config_fingerprint, "target": manifest.target.name},
        "options": options,
    }
    if isinstance(spec.options, RerankOptions):  # an embed job's record stays as it was: its outputs resume
        record["task"] = "rerank"
    return record


def reads_queries(spec: JobSpec) -> bool:
    """A rerank job without --query: each row brings its own query."""
    return isinstance(spec.options, RerankOptions) and spec.options.query is None


def worker_class(spec: JobSpec) -> type[Worker]:
    """What loads the job's engine: an Embedder, or a Scorer for a rerank job."""
    return Scorer if isinstance(spec.options, RerankOptions) else Embedder


def worker_for(spec: JobSpec) -> Worker:
    """The job's engine, loaded in this process."""
    return worker_class(spec)(spec.engine, spec.options)


def plan_job(spec: JobSpec) -> Plan:
    """Check the engine, input and output, and list the parts that are still to be computed."""
    if not (spec.engine / "manifest.json").exists():
        raise ValidationError(f"--engine: {spec.engine} is not an engine folder (no manifest.json)")
    worker_class(spec).check_task(spec.engine, read_manifest(spec.engine).task, spec.options)  # before anything is written
    files = input_files(spec.input)
    if reads_queries(spec) and any(p.suffix == ".txt" for p in files):
        raise ValidationError(f"--query: {spec.input} holds .txt files, which have no query field: give --query")
    parts = plan_parts(files, spec.chunk_size)
    prepare_output(spec.output, _record(spec, files), overwrite=spec.overwrite)
    done = done_parts(spec.output)
    extra = done - {p.index for p in parts}
    if extra:
        raise ValidationError(f"--output: {spec.output} holds parts the input does not have ({sorted(extra)[:5]})")
    todo = [p for p in parts if p.index not in done]
    return Plan(parts, todo, id_type(files, spec.fields), sum(p.count for p in parts))


def run_part(worker: Worker, part: Part, spec: JobSpec, ids: Any, progress: Callable[[int], None] | None = None) -> int:
    """Read, compute and write one part (`ids`: the id column's type, or None); the rows it wrote. `progress(rows)` as
    its rows are computed."""
    rows = read_part(part, spec.fields, ids is not None, with_queries=reads_queries(spec))
    values = worker.run(rows, progress)
    write_part(spec.output, part.index, part.start, values, rows.ids, ids)
    return len(rows.texts)


def run_local(spec: JobSpec) -> int:
    """Run the job in this process; the number of rows of the whole output."""
    plan = plan_job(spec)
    kept = plan.total - sum(p.count for p in plan.todo)
    if not spec.quiet:
        print(f"{plan.total} rows in {len(plan.parts)} parts; {len(plan.parts) - len(plan.todo)} parts already done", file=sys.stderr)
    if plan.todo:
        meter = Meter(plan.total, done=kept, enabled=not spec.quiet)
        worker = worker_for(spec)
        try:
            for started, part in enumerate(plan.todo, 1):
                maybe_exit(started)
                run_part(worker, part, spec, plan.id_type, meter.add)
        finally:
            worker.close()
        meter.finish()
    return plan.total
