"""A target that exists only in the tests: its engine is the checkpoint's word-embedding table
(`table.npy`), and its backend embeds a text as the mean of its tokens' rows. Registered by the
`fake_target` fixture (tests/test_fake_target.py) with `registry.register(TARGET)`; nothing else in
bei names it. It shows what a target provides: a build from the shared build steps, a backend
behind the `Backend` contract, a plan, its stages and a host check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bei.accuracy import compare, require_agreement
from bei.backend import Backend, Batch
from bei.buildsteps.context import BuildContext, BuildResult
from bei.buildsteps.manifest import write_engine
from bei.buildsteps.samples import sample_batch
from bei.engine.layout import staged_engine_dir
from bei.engine.manifest import Manifest, TargetInfo
from bei.errors import ExportError
from bei.hardware import Host
from bei.kinds import Precision, Task
from bei.targets.base import PlanDetails, PlanRequest, Target

NAME = "fake-numpy"
TABLE_FILE = "table.npy"


def mean_of_rows(table: np.ndarray, batch: Batch) -> np.ndarray:
    """Per row: the mean of the table rows of its real tokens (the reference the build verifies against)."""
    return np.stack([table[batch.input_ids[r][batch.attention_mask[r] == 1]].mean(axis=0) for r in range(len(batch.lengths))])


class TableBackend(Backend):
    name = NAME
    pads = True

    def __init__(self, table: Path, input_names: list[str]) -> None:
        self.table = np.load(table)
        self.input_names = input_names

    def infer(self, batch: Batch) -> np.ndarray:
        mask = batch.attention_mask[:, :, None].astype(np.float32)
        summed = (self.table[batch.input_ids] * mask).sum(axis=1)
        return (summed / mask.sum(axis=1)).astype(np.float32)


def _build(ctx: BuildContext) -> BuildResult:
    from safetensors.numpy import load_file

    if ctx.spec.task is not Task.EMBED:
        raise ExportError(f"{NAME} builds embedders only, not {ctx.spec.task.value}")
    with staged_engine_dir(ctx.engine_dir) as staging:
        with ctx.progress.stage("export"):
            weights = load_file(ctx.checkpoint.path / "model.safetensors")
            table = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight")).astype(np.float32)
            np.save(staging / TABLE_FILE, table)
        with ctx.progress.stage("verify"):
            sample = sample_batch(ctx.spec, ctx.tokenizer)
            agreement = compare(mean_of_rows(table, sample), TableBackend(staging / TABLE_FILE, ["input_ids"]).infer(sample))
            require_agreement(agreement, min_cosine=0.99999, max_abs_diff=1e-5, what=f"the {NAME} engine")
        return write_engine(
            ctx,
            staging,
            agreement,
            graph_file=TABLE_FILE,
            target=TargetInfo(name=NAME, versions={"numpy": np.__version__}),
            reference="numpy, per token row by row",
        )


def _open(folder: Path, manifest: Manifest, threads: int | None) -> Backend:
    return TableBackend(folder / manifest.graph_file, manifest.graph_inputs)


def _plan(request: PlanRequest) -> PlanDetails:
    return PlanDetails(Precision.FP32, notes=[f"{NAME}: the mean of word embeddings, for the registry's tests"])


def _check_host(manifest: Manifest, host: Host) -> None:
    """Runs wherever numpy does."""


TARGET = Target(
    name=NAME,
    label="the fake numpy target",
    summary="the mean of the checkpoint's word embeddings (tests only)",
    build=_build,
    open=_open,
    plan=_plan,
    stages=lambda quantized: ["resolve checkpoint", "read pooling", "export", "verify", "write"],
    check_host=_check_host,
    quantizations=frozenset({"no_quant"}),
)
