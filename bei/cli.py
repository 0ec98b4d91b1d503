"""`bei build` and `bei serve`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bei import __version__
from bei.errors import BeiError, ExportError
from bei.settings import add_arguments, engines_dir_default, settings_from
from bei.targets import registry

if TYPE_CHECKING:
    from bei.config import BeiConfig
    from bei.engine.manifest import SourceInfo

RAY_SERVE_OPTIONS = (
    "replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "ray_address",
    "num_gpus_per_replica",
    "num_cpus_per_replica",
)
BUILD_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")


def _require_build_extra() -> None:
    """`bei build` needs the `build` extra; `pip install bei` alone serves ONNX Runtime engines."""
    missing = []
    for name in BUILD_MODULES:  # the build imports them all anyway
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"bei build needs {', '.join(missing)}, which this install lacks: pip install 'bei[build]'")


def _dry_run(config_path: Path, target: str, as_json: bool) -> None:
    import json

    from bei.config import load_config

    config = load_config(config_path)
    _require_build_extra()
    from bei.build import plan_build
    from bei.progress import Progress

    _, _, plan = plan_build(
        config,
        config_dir=config_path.resolve().parent,
        target=target,
        progress=Progress([], enabled=not as_json),
        dry_run=True,
    )
    print(json.dumps(plan.as_dict(), indent=2) if as_json else plan.render())


def _build(config_path: Path, engines_root: Path, target: str, quiet: bool) -> Path:
    from bei.config import load_config

    config = load_config(config_path)  # config errors come before the heavy imports
    _require_build_extra()
    from bei.build import build_engine
    from bei.progress import Progress

    result = build_engine(
        config,
        config_dir=config_path.resolve().parent,
        engines_root=engines_root,
        target=target,
        progress=Progress([], enabled=not quiet),
    )
    print(f"engine written to {result.engine_dir}", file=sys.stderr)
    return result.engine_dir


def _up_to_date_engine(config_path: Path, engines_root: Path) -> Path | None:
    """The engine of this config, if one exists built from the same config by this bei version, with
    its files as built (a corrupt or edited engine, or one without recorded file hashes, is rebuilt),
    from the checkpoint its source has now (`_remote_changed`)."""
    from bei.config import load_config
    from bei.engine.integrity import verify_engine
    from bei.engine.manifest import read_manifest

    config = load_config(config_path)
    folder = engines_root / config.name
    try:
        manifest = read_manifest(folder)
        if manifest.config_fingerprint != config.fingerprint() or manifest.bei_version != __version__:
            return None
        if verify_engine(folder, manifest) is not None:  # built before bei recorded file hashes
            return None
    except BeiError as error:
        if folder.exists():
            print(f"{error.message}", file=sys.stderr)
        return None
    return None if _remote_changed(config, config_path, manifest.source) else folder


def _remote_changed(config: BeiConfig, config_path: Path, built_from: SourceInfo) -> bool:
    """Whether a REMOTE_URL tarball changed since the engine was built from it: the URL is revalidated
    (a conditional request, answered 304 while it is unchanged; a changed tarball replaces the cached
    extraction) and the tarball's sha256 compared with the one the engine recorded (engines built before
    bei recorded it: the checkpoint's file hashes). A pinned `sha256` is part of the config's
    fingerprint: nothing to ask. Unreachable with nothing cached, the engine is served as it is, with a
    warning."""
    from bei.build import resolve_config_checkpoint
    from bei.config import CheckpointSource

    repo = config.trt_llm.build.checkpoint_repository
    if repo.source is not CheckpointSource.REMOTE_URL or repo.sha256 is not None:
        return False

    def note(message: str) -> None:
        print(f"      {message}", file=sys.stderr, flush=True)

    try:
        checkpoint = resolve_config_checkpoint(config, config_path.resolve().parent, note)
    except BeiError as error:
        print(f"cannot revalidate the checkpoint of {config_path} ({error.message}): serving the engine built before", file=sys.stderr)
        return False
    if built_from.revision is not None and built_from.revision.startswith("sha256:"):
        same = checkpoint.revision == built_from.revision
    else:
        same = checkpoint.file_hashes() == built_from.file_hashes
    if same:
        return False
    print(f"the REMOTE_URL checkpoint of {config_path} changed since its engine was built: rebuilding it", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bei", description="Build and serve embedding, reranking, classification and NER engines.")
    parser.add_argument("--version", action="version", version=f"bei {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="compile a config.yaml into engines/<name>/")
    build.add_argument("config", type=Path, help="Truss-style config.yaml")
    build.add_argument("--engines-dir", type=Path, default=None, help="where engines go (default: ./engines, env BEI_ENGINES_DIR)")
    build.add_argument(
        "--target",
        default="auto",
        choices=registry.names(),
        help="auto (default): the first of "
        + ", ".join(t.name for t in registry.TARGETS)
        + " that builds on this machine (TensorRT where a CUDA GPU and tensorrt are present, the torch target on a CUDA "
        "GPU without TensorRT, else the ONNX Runtime CPU engine). " + "; ".join(f"{t.name}: {t.summary}" for t in registry.TARGETS),
    )
    build.add_argument("--quiet", action="store_true", help="no progress display")
    build.add_argument("--dry-run", action="store_true", help="print the plan (target, precision, profiles, memory) and stop")
    build.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")

    serve = commands.add_parser("serve", help="serve an engine directory over HTTP")
    serve.add_argument("engines", type=Path, nargs="*", help="engine directories (engines/<name>); several serve together")
    serve.add_argument("--config", type=Path, default=None, help="serve this config's engine, building it first when none is up to date")
    serve.add_argument("--engines-dir", type=Path, default=None, help="where engines go (default: ./engines)")
    add_arguments(serve)
    serve.add_argument("--ray", action="store_true", help="serve as a Ray Serve application of --replicas replicas (docs/scale.md)")
    serve.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="with --ray: replicas, each loading every engine (default 1; with autoscaling, how many start)",
    )
    serve.add_argument(
        "--min-replicas", type=int, default=None, help="with --ray: autoscale, down to this many replicas (default 1; 0: scale to zero)"
    )
    serve.add_argument(
        "--max-replicas", type=int, default=None, help="with --ray: autoscale, up to this many replicas (turns autoscaling on)"
    )
    serve.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="with --ray and --max-replicas: requests in flight per replica that autoscaling aims at (default 2, Ray Serve's)",
    )
    serve.add_argument("--ray-address", default=None, help="with --ray: auto (a running cluster) or host:6379 (default: a local Ray)")
    serve.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs each replica holds (default 0)")
    serve.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs each replica holds (default 1)")

    from bei.batch.command import add_arguments as add_batch_arguments

    for name, what in (("embed", "embed a file's texts"), ("rerank", "score a file's texts against a query")):
        files = commands.add_parser(
            name, help=f"{what} in process with --engine (a batch job), or through a running server (bei, BEI or TEI)"
        )
        files.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without --engine)")
        files.add_argument(
            "--input",
            type=Path,
            required=True,
            help=".txt (one text a line) or .jsonl (a text field); with --engine also .parquet, or a folder",
        )
        files.add_argument("--output", type=Path, required=True, help=".jsonl, or .npy for an array; with --engine a folder")
        files.add_argument("--batch-size", type=int, default=32, help="texts per request")
        files.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 8); with --ray, actors (default 2)")
        files.add_argument("--api-key", default=None, help="the server's API key (default: env BEI_API_KEY)")
        if name == "embed":
            files.add_argument("--model", default=None, help="model name, where the server serves several")
        else:
            files.add_argument("--query", default=None, help="the query every text is scored against (with --engine: else each row's own)")
        add_batch_arguments(files, name)

    args = parser.parse_args(argv)
    engines_root = getattr(args, "engines_dir", None) or engines_dir_default()
    try:
        if args.command == "build":
            if args.dry_run:
                _dry_run(args.config, args.target, args.json)
            else:
                _build(args.config, engines_root, args.target, args.quiet)
            return 0
        if args.command in ("embed", "rerank") and args.engine is not None:
            from bei.batch.command import run as run_batch

            return run_batch(args)
        if args.command in ("embed", "rerank") and args.ray:
            parser.error("--ray runs a batch job: give the engine with --engine")
        if args.command == "embed" and args.sparse:
            parser.error("--sparse writes a column of a batch job's Parquet parts: give the engine with --engine")
        if args.command == "rerank" and args.query is None:
            parser.error("bei rerank through a server needs --query (each row's own query needs --engine)")
        if args.command in ("embed", "rerank"):
            from bei.client import ClientError
            from bei.files_cli import embed_file, rerank_file

            try:
                if args.command == "embed":
                    count = embed_file(
                        args.url, args.input, args.output, batch_size=args.batch_size, concurrency=args.concurrency or 8, model=args.model,
                        api_key=args.api_key,
                    )  # fmt: skip
                else:
                    count = rerank_file(
                        args.url, args.query, args.input, args.output, batch_size=args.batch_size, concurrency=args.concurrency or 8,
                        api_key=args.api_key,
                    )  # fmt: skip
            except ClientError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"{count} texts written to {args.output}", file=sys.stderr)
            return 0
        settings = settings_from(args)
        if bool(args.engines) == (args.config is not None):
            parser.error("serve takes engine directories or --config, one of the two")
        engine_dirs = list(args.engines)
        if args.config is not None:
            engine_dir = _up_to_date_engine(args.config, engines_root)
            if engine_dir is None:
                print(f"no up-to-date engine for {args.config}: building it first", file=sys.stderr)
                engine_dir = _build(args.config, engines_root, "auto", quiet=False)
            engine_dirs = [engine_dir]
        ray_only = [name for name in RAY_SERVE_OPTIONS if getattr(args, name) != serve.get_default(name)]
        if not args.ray and ray_only:
            parser.error(f"{', '.join('--' + n.replace('_', '-') for n in ray_only)} only apply with --ray")
        if args.ray:
            from bei.ray_serve import Scaling, start

            scaling = Scaling.of({name: getattr(args, name) for name in Scaling.model_fields}, settings.max_concurrent_requests)
            start(
                engine_dirs,
                settings,
                scaling=scaling,
                address=args.ray_address,
                num_gpus=args.num_gpus_per_replica,
                num_cpus=args.num_cpus_per_replica,
            )
            return 0
        from bei.serve import serve as run_server

        run_server(engine_dirs, settings)
        return 0
    except BeiError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
