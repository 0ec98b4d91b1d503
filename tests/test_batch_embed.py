"""`bei embed --engine`: the in-process batch job (bei/batch/): Parquet parts whose rows equal
sentence-transformers' vectors, exactly one output row per input row, and a rerun after an interruption
that computes only the missing parts and ends with the same output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bei import cli
from bei.batch import job as batch_job
from bei.batch.job import JobSpec, run_local
from bei.batch.parts import JOB_FILE, done_parts, part_name, read_output
from bei.batch.sources import Fields
from bei.errors import ValidationError
from bei.testing.inproc_server import make_and_build
from tests.servers import MIN_COSINE

WORDS = "alpha beta gamma delta river stone cloud paper light garden window music".split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, engine) of a tiny normalized BERT embedder, the ONNX Runtime fp32 engine."""
    root = tmp_path_factory.mktemp("batch-engine")
    checkpoint, engine, _ = make_and_build(str(root), "tiny-batch", "bert", "embed", {"normalize": True}, {"target": "onnxruntime"})
    return Path(checkpoint), Path(engine)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def embeddings(output: Path) -> np.ndarray:
    table = read_output(output)
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32)


def test_jsonl_equals_sentence_transformers_row_by_row(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    checkpoint, engine = tiny_engine
    items = texts(700)
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(items)])
    output = tmp_path / "out"
    code = cli.main(["embed", "--engine", str(engine), "--input", str(source), "--output", str(output), "--chunk-size", "256"])
    assert code == 0
    assert done_parts(output) == {0, 1, 2}
    table = read_output(output)
    assert table.num_rows == len(items)
    assert table.column("row").to_pylist() == list(range(len(items)))
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(items))]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    want = SentenceTransformer(str(checkpoint), device="cpu").encode(items, convert_to_numpy=True)
    got = embeddings(output)
    assert got.shape == want.shape
    assert cosines(got, want).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalized, as the model is


def test_folder_of_txt_and_parquet_numbers_rows_across_files(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bei.batch.embedder import Embedder
    from bei.batch.options import EmbedOptions

    _, engine = tiny_engine
    first, second = texts(150, seed=1), texts(230, seed=2)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(first) + "\n")
    pq.write_table(pa.table({"body": second, "key": list(range(1000, 1230))}), folder / "b.parquet", row_group_size=50)
    output = tmp_path / "out"
    spec = JobSpec(engine, folder, output, chunk_size=64, fields=Fields(text="body", id="key"), quiet=True)
    assert run_local(spec) == 380
    table = read_output(output)
    assert table.column("row").to_pylist() == list(range(380))
    assert "id" not in table.column_names  # the first file (a .txt) has no ids
    embedder = Embedder(engine, EmbedOptions(engine_threads=1))
    try:
        want = embedder.embed(first + second)
    finally:
        embedder.close()
    assert cosines(embeddings(output), want).min() >= MIN_COSINE


def test_resume_after_an_interruption_gives_the_same_output(
    tiny_engine: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, engine = tiny_engine
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts(500, seed=3))])
    reference = tmp_path / "reference"
    run_local(JobSpec(engine, source, reference, chunk_size=100, quiet=True))

    output = tmp_path / "out"
    spec = JobSpec(engine, source, output, chunk_size=100, quiet=True)
    real_write = batch_job.write_part
    written: list[int] = []

    def killed_after_two(out: Path, index: int, *args: Any, **kwargs: Any) -> Path:
        if len(written) == 2:  # the process dies while writing its third part: a temporary file is left behind
            (out / f".{part_name(index)}.tmp-dead").write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt
        written.append(index)
        return real_write(out, index, *args, **kwargs)

    monkeypatch.setattr(batch_job, "write_part", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_local(spec)
    assert done_parts(output) == {0, 1}
    monkeypatch.undo()

    kept = {i: os.stat(output / part_name(i)).st_mtime_ns for i in (0, 1)}
    assert run_local(spec) == 500
    assert done_parts(output) == {0, 1, 2, 3, 4}
    assert {i: os.stat(output / part_name(i)).st_mtime_ns for i in (0, 1)} == kept  # finished parts are kept
    assert not list(output.glob(".*tmp*"))

    (output / part_name(3)).unlink()  # a lost part is computed again
    assert run_local(spec) == 500
    got, want = read_output(output), read_output(reference)
    assert got.num_rows == 500
    assert got.column("row").to_pylist() == want.column("row").to_pylist() == list(range(500))
    assert got.column("id").to_pylist() == list(range(500))
    assert cosines(embeddings(output), embeddings(reference)).min() >= MIN_COSINE


def test_another_job_in_the_same_output_is_refused(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    _, engine = tiny_engine
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(50)])
    output = tmp_path / "out"
    run_local(JobSpec(engine, source, output, chunk_size=20, quiet=True))
    with pytest.raises(ValidationError, match="chunk_size"):
        run_local(JobSpec(engine, source, output, chunk_size=30, quiet=True))
    assert run_local(JobSpec(engine, source, output, chunk_size=30, quiet=True, overwrite=True)) == 50
    assert done_parts(output) == {0, 1}
    assert json.loads((output / JOB_FILE).read_text())["chunk_size"] == 30
    (tmp_path / "out.npy").write_bytes(b"")
    with pytest.raises(ValidationError, match="is a file"):
        run_local(JobSpec(engine, source, tmp_path / "out.npy", quiet=True))


def test_without_engine_embed_is_still_the_http_client(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    from bei.testing.inproc_server import serve_engine

    _, engine = tiny_engine
    source = tmp_path / "in.txt"
    source.write_text("hello\nworld\n")
    with serve_engine(engine) as url:
        assert cli.main(["embed", "--url", url, "--input", str(source), "--output", str(tmp_path / "out.npy")]) == 0
    assert np.load(tmp_path / "out.npy").shape[0] == 2


def test_a_job_killed_mid_run_resumes_to_the_same_output(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    """A `bei embed` process that dies on its third part (os._exit, as kill -9), then the same command again."""
    from bei.batch.faults import FAULT_EXIT_AT, FAULT_MARKER
    from tests.servers import bei_command, bei_env

    _, engine = tiny_engine
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(600, seed=4)])
    output = tmp_path / "out"
    command = bei_command(
        "embed", "--engine", engine, "--input", source, "--output", output, "--chunk-size", "100", "--engine-threads", "1"
    )
    env = bei_env(**{FAULT_EXIT_AT: "3", FAULT_MARKER: str(tmp_path / "died")})
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 17, first.stderr
    assert done_parts(output) == {0, 1}
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "2 parts already done" in second.stderr and "rows/s" in second.stderr
    reference = tmp_path / "reference"
    run_local(JobSpec(engine, source, reference, chunk_size=100, quiet=True))
    table = read_output(output)
    assert table.column("row").to_pylist() == list(range(600))
    assert cosines(embeddings(output), embeddings(reference)).min() >= MIN_COSINE


def test_ray_and_pyarrow_are_imported_only_by_the_job() -> None:
    """`bei` itself, and the batch modules, import neither ray nor pyarrow until a job runs."""
    probe = (
        "import sys, bei.cli, bei.batch.command, bei.batch.ray_job, bei.batch.sources, bei.batch.parts; "
        "print(sorted(m for m in ('ray', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_minilm_job_equals_sentence_transformers(minilm_build: Any, st_model: Any, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 engine: every output row is sentence-transformers' vector of its input row."""
    items = texts(300, seed=6)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(items) + "\n")
    output = tmp_path / "out"
    assert run_local(JobSpec(minilm_build.engine_dir, source, output, chunk_size=128, quiet=True)) == 300
    table = read_output(output)
    assert table.column("row").to_pylist() == list(range(300))
    assert cosines(embeddings(output), st_model.encode(items, convert_to_numpy=True)).min() >= MIN_COSINE


def test_every_part_has_the_id_type_of_the_first_record(tiny_engine: tuple[Path, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, engine = tiny_engine
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"id": f"k{i}" if i < 3 else i, "text": "x"} for i in range(6)])
    run_local(JobSpec(engine, mixed, tmp_path / "strings", chunk_size=3, quiet=True))
    assert read_output(tmp_path / "strings").column("id").to_pylist() == ["k0", "k1", "k2", "3", "4", "5"]
    numbers_first = write_jsonl(tmp_path / "n.jsonl", [{"id": i if i < 3 else f"k{i}", "text": "x"} for i in range(6)])
    with pytest.raises(ValidationError, match="id-field"):
        run_local(JobSpec(engine, numbers_first, tmp_path / "numbers", chunk_size=3, quiet=True))
    pq.write_table(pa.table({"text": ["a", "b", "c"], "id": pa.array([7, 8, 9], pa.int32())}), tmp_path / "t.parquet")
    run_local(JobSpec(engine, tmp_path / "t.parquet", tmp_path / "parquet", chunk_size=2, quiet=True))
    assert read_output(tmp_path / "parquet").schema.field("id").type == pa.int32()
