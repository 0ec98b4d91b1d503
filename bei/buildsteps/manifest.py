"""The last stage of every build: the manifest, the tokenizer and reference files, written into the
staging folder, the manifest last (a folder without one is never loaded)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bei import __version__
from bei.accuracy import Agreement
from bei.buildsteps.context import BuildContext, BuildResult
from bei.engine.integrity import hash_engine_files
from bei.engine.manifest import DenseLayerInfo, Manifest, PoolingInfo, SourceInfo, TargetInfo, VerificationInfo
from bei.modeling.module import OUTPUT_NAMES, input_names

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


def manifest_for(
    ctx: BuildContext,
    agreement: Agreement,
    *,
    graph_file: str,
    target: TargetInfo,
    reference: str,
    quantization: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of an engine of any target."""
    config, checkpoint, spec, plan = ctx.config, ctx.checkpoint, ctx.spec, ctx.plan
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
        task=spec.task,
        architecture=spec.architecture,
        model_type=spec.model_type,
        base_model=spec.base_model,
        pooling=PoolingInfo(modes=[m.value for m in spec.pooling.modes], include_prompt=spec.pooling.include_prompt)
        if spec.pooling
        else None,
        normalize=spec.normalize,
        embedding_dim=spec.embedding_dim,
        colbert_dim=spec.colbert_dim or None,
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
        build_time=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(ctx.seconds(), 2),
        verification=VerificationInfo(
            reference=reference,
            samples=agreement.samples,
            max_abs_diff=agreement.max_abs_diff,
            min_cosine=agreement.min_cosine,
        ),
        config=config.model_dump(mode="json"),
        config_fingerprint=config.fingerprint(),
        profiles=list(plan.profiles),
        dense_layers=[
            DenseLayerInfo(in_features=d.in_features, out_features=d.out_features, bias=d.bias, activation=d.activation) for d in spec.dense
        ],
        quantization=quantization,
    )


def write_engine(
    ctx: BuildContext,
    staging: Path,
    agreement: Agreement,
    *,
    graph_file: str,
    target: TargetInfo,
    reference: str,
    quantization: dict[str, Any] | None = None,
) -> BuildResult:
    """The `write` stage of every target: tokenizer and reference files, then the manifest with the
    sha256 of every file (checked at load)."""
    with ctx.progress.stage("write"):
        manifest = manifest_for(ctx, agreement, graph_file=graph_file, target=target, reference=reference, quantization=quantization)
        for name in TOKENIZER_FILES:
            if (ctx.checkpoint.path / name).exists():
                shutil.copy2(ctx.checkpoint.path / name, staging / name)
        manifest = manifest.model_copy(update={"engine_files": hash_engine_files(staging)})
        manifest.write(staging)
    return BuildResult(engine_dir=ctx.engine_dir.resolve(), manifest=manifest)
