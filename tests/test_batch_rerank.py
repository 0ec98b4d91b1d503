"""`bei rerank --engine`: the batch job of bei/batch/ for a reranker: a query and a corpus file, or a query per
row, into Parquet parts (`row`, `score`, `id`) whose scores are sentence-transformers' CrossEncoder's and
`bei serve`'s /rerank's, row by row; a rerun after a lost part recomputes only that part."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bei import cli
from bei.batch.parts import part_name, read_output
from bei.testing.inproc_server import make_and_build, serve_engine
from tests.test_batch_embed import texts, write_jsonl

QUERY = "which text is about a river?"
ATOL = 1e-5  # fp32 ONNX Runtime vs torch


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, engine) of a tiny BERT reranker, the ONNX Runtime fp32 engine."""
    root = tmp_path_factory.mktemp("batch-rerank")
    checkpoint, engine, _ = make_and_build(str(root), "tiny-batch-rerank", "bert", "rerank", {"seed": 3}, {"target": "onnxruntime"})
    return Path(checkpoint), Path(engine)


def _cross_encoder(checkpoint: Path, pairs: list[tuple[str, str]], raw: bool = False) -> np.ndarray:
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(checkpoint), device="cpu")
    if raw:
        return np.asarray(model.predict(pairs, convert_to_numpy=True, activation_fn=torch.nn.Identity()), dtype=np.float64)
    return np.asarray(model.predict(pairs, convert_to_numpy=True), dtype=np.float64)  # sigmoid of the one logit


def _rerank(*args: str | Path) -> int:
    return cli.main(["rerank", *[str(a) for a in args], "--quiet", "--engine-threads", "1"])


def _scores(output: Path) -> np.ndarray:
    return np.array(read_output(output).column("score").to_pylist(), dtype=np.float64)


def test_a_query_and_a_corpus_equal_cross_encoder_and_bei_serve(reranker: tuple[Path, Path], tmp_path: Path) -> None:
    import httpx

    checkpoint, engine = reranker
    corpus = texts(300, seed=4)
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(corpus)])
    output = tmp_path / "scores"
    assert _rerank("--engine", engine, "--input", source, "--output", output, "--query", QUERY, "--chunk-size", "64") == 0
    table = read_output(output)
    assert table.column_names == ["row", "score", "id"]
    assert table.column("row").to_pylist() == list(range(300))
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(300)]
    assert len(list(output.glob("part-*.parquet"))) == 5
    scores = _scores(output)
    np.testing.assert_allclose(scores, _cross_encoder(checkpoint, [(QUERY, t) for t in corpus]), atol=ATOL)
    with serve_engine(engine) as url:
        served = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": corpus[:50]}, timeout=60).json()
    np.testing.assert_allclose(scores[:50], [r["score"] for r in served], atol=ATOL)


def test_a_query_per_row_from_parquet_and_raw_scores(reranker: tuple[Path, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    checkpoint, engine = reranker
    documents = texts(90, seed=5)
    queries = [f"question {i % 7} about {documents[(i * 3) % 90].split()[0]}" for i in range(90)]
    source = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": queries, "text": documents, "id": list(range(500, 590))}), source, row_group_size=20)
    args = ["--engine", engine, "--input", source, "--query-field", "q", "--chunk-size", "32"]
    assert _rerank(*args, "--output", tmp_path / "scores") == 0
    assert _rerank(*args, "--output", tmp_path / "raw", "--raw-scores") == 0
    pairs = list(zip(queries, documents, strict=True))
    np.testing.assert_allclose(_scores(tmp_path / "scores"), _cross_encoder(checkpoint, pairs), atol=ATOL)
    np.testing.assert_allclose(_scores(tmp_path / "raw"), _cross_encoder(checkpoint, pairs, raw=True), atol=1e-4)
    assert read_output(tmp_path / "raw").column("id").to_pylist() == list(range(500, 590))


def test_a_lost_part_is_recomputed_alone(reranker: tuple[Path, Path], tmp_path: Path) -> None:
    _, engine = reranker
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts(100, seed=6)) + "\n")
    output = tmp_path / "scores"
    args = ["--engine", engine, "--input", source, "--output", output, "--query", QUERY, "--chunk-size", "30"]
    assert _rerank(*args) == 0
    first = _scores(output)
    kept = {i: os.stat(output / part_name(i)).st_mtime_ns for i in (0, 1, 3)}
    (output / part_name(2)).unlink()
    assert _rerank(*args) == 0
    assert {i: os.stat(output / part_name(i)).st_mtime_ns for i in (0, 1, 3)} == kept
    np.testing.assert_array_equal(_scores(output), first)
    assert read_output(output).column("row").to_pylist() == list(range(100))
    assert _rerank(*args[:-2], "--query", "another query") == 1  # another job in the same output: refused


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("corpus.txt", "--query: "),  # without --query, a .txt corpus holds no per-row queries
        ("no-query.jsonl", '"query" field (--query-field)'),
    ],
)
def test_a_missing_query_is_a_clear_error(
    reranker: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: str, message: str
) -> None:
    _, engine = reranker
    (tmp_path / "corpus.txt").write_text("a\nb\n")
    (tmp_path / "no-query.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    assert _rerank("--engine", engine, "--input", tmp_path / inputs, "--output", tmp_path / "out") == 1
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("part-*"))


def test_an_embedding_engine_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, embed, _ = make_and_build(str(tmp_path), "tiny-embed", "bert", "embed", {}, {"target": "onnxruntime"})
    (tmp_path / "corpus.txt").write_text("a\nb\n")
    assert _rerank("--engine", embed, "--input", tmp_path / "corpus.txt", "--output", tmp_path / "out", "--query", QUERY) == 1
    assert "is a 'embed' engine; bei rerank needs a 'rerank' engine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written: the right engine can then use it


def test_without_engine_rerank_still_needs_a_query(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["rerank", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o.jsonl")])
    assert "needs --query" in capsys.readouterr().err
