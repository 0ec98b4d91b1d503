"""`bei embed --engine ... --ray` on a local Ray with 2 CPUs: 2,000 texts give exactly 2,000 rows equal to the
local job's, also when an actor process dies mid-job (Ray Data restarts it and retries its part)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bei import cli
from bei.batch.faults import FAULT_EXIT_AT, FAULT_MARKER
from bei.batch.job import JobSpec, run_local
from bei.batch.parts import done_parts, read_output
from bei.testing.inproc_server import make_and_build
from tests.servers import MIN_COSINE
from tests.test_batch_embed import cosines, embeddings, texts

ray = pytest.importorskip("ray")

ROWS = 2000


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(engine, input, the local job's output) for 2,000 texts."""
    root = tmp_path_factory.mktemp("batch-ray")
    _, engine, _ = make_and_build(str(root), "tiny-ray", "bert", "embed", {"normalize": True}, {"target": "onnxruntime"})
    source = root / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts(ROWS, seed=5))))
    reference = root / "local"
    run_local(JobSpec(Path(engine), source, reference, chunk_size=250, quiet=True))
    return Path(engine), source, reference


def _check(output: Path, reference: Path) -> None:
    table = read_output(output)
    assert table.num_rows == ROWS
    assert table.column("row").to_pylist() == list(range(ROWS))
    assert table.column("id").to_pylist() == list(range(ROWS))
    assert cosines(embeddings(output), embeddings(reference)).min() >= MIN_COSINE


def _embed_on_ray(engine: Path, source: Path, output: Path) -> int:
    return cli.main(
        ["embed", "--engine", str(engine), "--input", str(source), "--output", str(output), "--chunk-size", "250"]
        + ["--ray", "--concurrency", "2", "--num-cpus-per-worker", "1", "--quiet"]
    )


def test_ray_job_equals_the_local_job(local_ray: None, job: tuple[Path, Path, Path], tmp_path: Path) -> None:
    engine, source, reference = job
    assert _embed_on_ray(engine, source, tmp_path / "out") == 0
    assert done_parts(tmp_path / "out") == set(range(8))
    _check(tmp_path / "out", reference)


def test_an_actor_killed_mid_job_still_gives_every_row_once(
    local_ray: None, job: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, source, reference = job
    marker = tmp_path / "actor-died"
    # the actors of this job see the variables through the runtime environment of their job
    monkeypatch.setenv(FAULT_EXIT_AT, "2")
    monkeypatch.setenv(FAULT_MARKER, str(marker))
    assert _embed_on_ray(engine, source, tmp_path / "out") == 0
    assert marker.exists(), "no actor died: the fault was not injected"
    _check(tmp_path / "out", reference)
    assert np.isfinite(embeddings(tmp_path / "out")).all()


def test_ray_resumes_a_local_job(local_ray: None, job: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Parts a local job left are kept; Ray computes only the missing ones."""
    import os

    from bei.batch.parts import part_name

    engine, source, reference = job
    output = tmp_path / "out"
    run_local(JobSpec(engine, source, output, chunk_size=250, quiet=True))
    for index in (1, 4, 7):
        (output / part_name(index)).unlink()
    kept = {i: os.stat(output / part_name(i)).st_mtime_ns for i in (0, 2, 3, 5, 6)}
    assert _embed_on_ray(engine, source, output) == 0
    assert {i: os.stat(output / part_name(i)).st_mtime_ns for i in kept} == kept
    _check(output, reference)


def test_rerank_on_ray_equals_the_local_job(local_ray: None, tmp_path: Path) -> None:
    """`bei rerank --engine ... --ray`: the same parts through the same pipeline (PartWorker loads a Scorer)."""
    from bei.batch.options import RerankOptions

    _, engine, _ = make_and_build(str(tmp_path), "tiny-rerank-ray", "bert", "rerank", {"seed": 2}, {"target": "onnxruntime"})
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"query": f"q {i % 5}", "text": t}) + "\n" for i, t in enumerate(texts(300, seed=6))))
    run_local(JobSpec(Path(engine), source, tmp_path / "local", chunk_size=100, options=RerankOptions(), quiet=True))
    argv = ["rerank", "--engine", engine, "--input", str(source), "--output", str(tmp_path / "ray"), "--chunk-size", "100"]
    assert cli.main([*argv, "--ray", "--concurrency", "2", "--num-cpus-per-worker", "1", "--quiet"]) == 0
    local, on_ray = read_output(tmp_path / "local"), read_output(tmp_path / "ray")
    assert on_ray.column("row").to_pylist() == list(range(300))
    np.testing.assert_allclose(on_ray.column("score").to_numpy(), local.column("score").to_numpy(), atol=1e-6)
