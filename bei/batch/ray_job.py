"""`bei embed --engine ... --ray`: the batch job's parts as a Ray Data pipeline, one engine per actor.

The driver plans the job as the local job does (bei/batch/job.py: the parts, the finished ones skipped),
then Ray Data runs: the parts still to do (`from_items`, one descriptor a row) -> `map_batches` with
`PartWorker`, an actor class that loads the engine once per actor and, per part, reads the part's
rows, embeds (or scores) them and writes the part's Parquet file (temporary file + rename) -> one summary row per
part back to the driver, which counts rows/s and checks that every part is there.

Parts are written by the actors rather than by `Dataset.write_parquet` so that the output is the local
job's: a part file is complete or absent, a retried part rewrites the same file, and a rerun (with or
without --ray) resumes. An actor that dies is restarted by Ray Data and its part retried (actor pools
run with max_restarts=-1, max_task_retries=-1).

Every node reads the engine folder, the input and the output at the same paths: a shared filesystem
(NFS, a mounted bucket, a PVC mounted ReadWriteMany on every KubeRay pod), and the same bei installed
on each node (`pip install 'bei[ray]'`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from bei.batch.faults import forwarded, maybe_exit
from bei.batch.meter import Meter
from bei.batch.parts import part_name
from bei.batch.sources import Part, Segment
from bei.errors import BeiError

MAX_BLOCKS = 2000


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray (or the one this process already joined)
    concurrency: int = 2  # actors
    num_gpus: float = 0.0  # per actor
    num_cpus: float = 1.0  # per actor


def _encode(part: Part) -> str:
    return json.dumps({"index": part.index, "start": part.start, "segments": [asdict(s) for s in part.segments]})


def _decode(text: str) -> Part:
    data = json.loads(text)
    return Part(data["index"], data["start"], tuple(Segment(**s) for s in data["segments"]))


class PartWorker:
    """A Ray Data actor: the engine loaded once (bei.batch.job.worker_for), then one part per call (batch_size=1)."""

    def __init__(self, spec: Any, id_type: Any) -> None:
        from bei.batch.job import worker_for

        self.spec = spec
        self.id_type = id_type
        self.worker = worker_for(spec)
        self.calls = 0

    def __del__(self) -> None:  # Ray Data deletes the actor's instance when the pool shuts down
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from bei.batch.job import run_part

        indices, rows = [], []
        for text in batch["part"]:
            self.calls += 1
            maybe_exit(self.calls)
            part = _decode(str(text))
            if (self.spec.output / part_name(part.index)).exists():  # a retried block: its parts written before the crash stand
                rows.append(part.count)
            else:
                rows.append(run_part(self.worker, part, self.spec, self.id_type))
            indices.append(part.index)
        return {"part": np.array(indices, dtype=np.int64), "rows": np.array(rows, dtype=np.int64)}


def _init_ray(options: RayOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    if options.address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=options.address)


def _actor_args() -> dict[str, Any]:
    """The fault-injection variables of this process, for the actors (tests)."""
    env = forwarded()
    return {"runtime_env": {"env_vars": env}} if env else {}


def run_ray(spec: Any, options: RayOptions) -> int:
    """Run the job on Ray; the number of rows of the whole output. `spec`: a bei.batch.job.JobSpec."""
    import ray

    from bei.batch.job import plan_job

    spec = replace(spec, engine=spec.engine.resolve(), input=spec.input.resolve(), output=spec.output.resolve())
    if spec.options.engine_threads is None:  # an engine call uses the CPUs its actor holds, not the node's
        spec = replace(spec, options=replace(spec.options, engine_threads=max(1, int(options.num_cpus))))
    plan = plan_job(spec)
    kept = plan.total - sum(p.count for p in plan.todo)
    if not spec.quiet:
        print(f"{plan.total} rows in {len(plan.parts)} parts; {len(plan.parts) - len(plan.todo)} parts already done", file=sys.stderr)
    if not plan.todo:
        return plan.total
    _init_ray(options)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the meter below says rows/s and ETA
    blocks = min(len(plan.todo), MAX_BLOCKS)  # one part a block (a block is what a dead actor's retry redoes), up to MAX_BLOCKS
    dataset = ray.data.from_items([{"part": _encode(p)} for p in plan.todo], override_num_blocks=blocks)
    results = dataset.map_batches(
        PartWorker,
        fn_constructor_kwargs={"spec": spec, "id_type": plan.id_type},
        batch_size=1,
        concurrency=options.concurrency,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus or None,
        **_actor_args(),
    )
    meter = Meter(plan.total, done=kept, enabled=not spec.quiet)
    finished: set[int] = set()
    for row in results.iter_rows():
        finished.add(int(row["part"]))
        meter.add(int(row["rows"]))
    meter.finish()
    missing = sorted({p.index for p in plan.todo} - finished)
    if missing:
        raise BeiError(f"the Ray job ended without parts {missing[:10]}: rerun the same command to compute them")
    return plan.total
