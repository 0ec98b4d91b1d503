"""The flags of `bei embed --engine ...` and `bei rerank --engine ...` (the batch jobs) and the commands themselves.

Without --engine, `bei embed` and `bei rerank` stay the HTTP clients of a running server (bei/files_cli.py, --url).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bei.batch.options import DEFAULT_CHUNK, EmbedOptions, RerankOptions
from bei.batch.sources import Fields
from bei.errors import BeiError

if TYPE_CHECKING:
    from bei.batch.job import JobSpec


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The batch job's flags of `bei embed` or `bei rerank` (`command`)."""
    job = parser.add_argument_group("batch job (--engine: in process, no server; --output is then a folder of Parquet parts)")
    job.add_argument("--engine", type=Path, default=None, help="engine folder (engines/<name>): run the job in process, no server")
    job.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=f"rows per part file (default {DEFAULT_CHUNK})")
    job.add_argument("--text-field", default="text", help=".jsonl field / Parquet column of the text (default text)")
    job.add_argument("--id-field", default="id", help=".jsonl field / Parquet column carried over as `id` (default id)")
    if command == "embed":
        job.add_argument(
            "--normalize", action=argparse.BooleanOptionalAction, default=None, help="L2-normalize (default: as the model does)"
        )
        job.add_argument("--prompt-name", default=None, help="the model's prompt to prefix (default: its default prompt, if any)")
        job.add_argument("--dimensions", type=int, default=None, help="keep the first N dimensions (Matryoshka models)")
        job.add_argument(
            "--sparse", action="store_true", help="bge-m3 (embed_m3) engines: their lexical weights too, a `sparse` column as /embed_sparse"
        )
    else:
        job.add_argument("--query-field", default="query", help="without --query: the .jsonl field / Parquet column of each row's query")
        job.add_argument("--raw-scores", action="store_true", help="the reranker's logits, without the sigmoid")
    job.add_argument("--no-truncate", dest="truncate", action="store_false", help="fail on a text over the model's limit")
    job.add_argument("--engine-threads", type=int, default=None, help="threads of one engine call (default: all cores)")
    job.add_argument("--overwrite", action="store_true", help="--output holds another job's parts: delete them and start over")
    job.add_argument("--quiet", action="store_true", help="no progress display")
    ray = parser.add_argument_group("Ray (with --engine): the parts as a Ray Data pipeline, one engine per actor")
    ray.add_argument("--ray", action="store_true", help="run on a Ray cluster (pip install 'bei[ray]')")
    ray.add_argument("--ray-address", default=None, help="auto (a running cluster), ray://host:10001 or host:6379 (default: a local Ray)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs each actor holds (default 0)")
    ray.add_argument("--num-cpus-per-worker", type=float, default=1.0, help="CPUs each actor holds (default 1)")


def spec_from(args: argparse.Namespace) -> JobSpec:
    from bei.batch.job import JobSpec

    options: EmbedOptions | RerankOptions
    if args.command == "embed":
        options = EmbedOptions(
            normalize=args.normalize,
            prompt_name=args.prompt_name,
            dimensions=args.dimensions,
            sparse=args.sparse,
            truncate=args.truncate,
            engine_threads=args.engine_threads,
        )
    else:
        options = RerankOptions(query=args.query, raw_scores=args.raw_scores, truncate=args.truncate, engine_threads=args.engine_threads)
    return JobSpec(
        engine=args.engine,
        input=args.input,
        output=args.output,
        chunk_size=args.chunk_size,
        fields=Fields(text=args.text_field, id=args.id_field, query=getattr(args, "query_field", "query")),
        options=options,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def _require(module: str, extra: str, command: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BeiError(
            f"{command} {'--ray ' if extra == 'ray' else ''}needs {module}, which this install lacks: pip install 'bei[{extra}]'"
        )


def run(args: argparse.Namespace) -> int:
    command = f"bei {args.command}"
    _require("pyarrow", "batch", command)
    if args.ray:
        _require("ray", "ray", command)
    spec = spec_from(args)
    if args.ray:
        from bei.batch.ray_job import RayOptions, run_ray

        rows = run_ray(
            spec,
            RayOptions(
                address=args.ray_address,
                concurrency=args.concurrency or 2,
                num_gpus=args.num_gpus_per_worker,
                num_cpus=args.num_cpus_per_worker,
            ),
        )
    else:
        from bei.batch.job import run_local

        rows = run_local(spec)
    print(f"{rows} rows in {spec.output}", file=sys.stderr)
    return 0
