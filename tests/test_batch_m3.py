"""`bei embed --engine` on a bge-m3 engine (task embed_m3): the `embedding` column equals what POST
/v1/embeddings answers for the same texts, and with --sparse the `sparse` column equals /embed_sparse
(the same token ids, weights within fp32 noise), for a server on 127.0.0.1 serving the same engine."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from bei import cli
from bei.batch.job import JobSpec, run_local
from bei.batch.options import EmbedOptions
from bei.batch.parts import JOB_FILE, read_output
from bei.errors import ValidationError
from bei.testing.inproc_server import make_and_build, serve_engine
from bei.testing.tiny_models import TEXTS
from tests.compat import ok

# repeated token ids (a term's weight is the largest of its tokens') and special tokens spelled in the text
INPUTS = [*TEXTS, "the cat and the dog and the bird and the cat", "<s> a </s> b", "x"]


M3 = {"pooling": "cls", "normalize": True, "bge_m3": True}
Served = tuple[list[list[float]], list[list[dict[str, float]]]]


def build_m3(root: Path, **kwargs: object) -> Path:
    _, engine, _ = make_and_build(str(root), "m3", "xlm-roberta", "embed", {**M3, **kwargs}, {"target": "onnxruntime"})
    return Path(engine)


def answers(engine: Path) -> Served:
    """The server's /v1/embeddings vectors and /embed_sparse weights of INPUTS."""
    with serve_engine(engine) as url, httpx.Client(base_url=url, timeout=60.0) as client:
        dense = ok(client.post("/v1/embeddings", json={"input": INPUTS, "encoding_format": "float"}))
        sparse = ok(client.post("/embed_sparse", json={"inputs": INPUTS}))
    return [d["embedding"] for d in dense["data"]], sparse


@pytest.fixture(scope="module")
def m3_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_m3(tmp_path_factory.mktemp("batch-m3"))


@pytest.fixture(scope="module")
def served(m3_engine: Path) -> Served:
    return answers(m3_engine)


def write_input(tmp_path: Path) -> Path:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(INPUTS)))
    return source


def assert_columns_equal(output: Path, served: Served) -> None:
    """The job's `embedding` and `sparse` columns equal the server's answers, row by row."""
    dense, sparse = served
    table = read_output(output)
    assert table.column_names == ["row", "embedding", "sparse", "id"]
    assert table.column("row").to_pylist() == list(range(len(INPUTS)))
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(INPUTS))]
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, np.array(dense, dtype=np.float32), atol=1e-5)
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() < 1e-5  # bge-m3's Normalize, as /v1/embeddings
    got_sparse = table.column("sparse").to_pylist()
    assert any(len(row) > 1 for row in got_sparse)
    for i, (got, want) in enumerate(zip(got_sparse, sparse, strict=True)):
        assert [item["index"] for item in got] == [item["index"] for item in want], f"row {i}: token ids"
        np.testing.assert_allclose([item["value"] for item in got], [item["value"] for item in want], atol=1e-5, err_msg=f"row {i}")
    assert not {0, 2} & {item["index"] for item in got_sparse[-2]}  # <s> and </s> are never terms


def test_dense_and_sparse_columns_equal_the_server_routes(m3_engine: Path, served: Served, tmp_path: Path) -> None:
    output = tmp_path / "out"
    args = ["embed", "--engine", str(m3_engine), "--input", str(write_input(tmp_path)), "--output", str(output)]
    assert cli.main([*args, "--chunk-size", "5", "--sparse", "--quiet"]) == 0
    assert_columns_equal(output, served)


def test_a_default_prompt_goes_into_the_dense_column_only(served: Served, tmp_path: Path) -> None:
    """/v1/embeddings prefixes the model's default prompt, /embed_sparse nothing: so do the two columns."""
    engine = build_m3(tmp_path / "build", prompts={"query": "query: "}, default_prompt_name="query")  # m3_engine's weights
    prompted = answers(engine)
    assert np.abs(np.array(prompted[0]) - np.array(served[0])).max() > 1e-3  # the prompt changes the dense vectors
    assert [[i["index"] for i in row] for row in prompted[1]] == [[i["index"] for i in row] for row in served[1]]  # not the sparse
    output = tmp_path / "out"
    assert run_local(JobSpec(engine, write_input(tmp_path), output, options=EmbedOptions(sparse=True), quiet=True)) == len(INPUTS)
    assert_columns_equal(output, prompted)


def test_without_sparse_only_the_dense_column(m3_engine: Path, served: Served, tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert run_local(JobSpec(m3_engine, write_input(tmp_path), output, quiet=True)) == len(INPUTS)
    table = read_output(output)
    assert table.column_names == ["row", "embedding", "id"]
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), np.array(served[0]), atol=1e-5)
    assert "sparse" not in json.loads((output / JOB_FILE).read_text())["options"]  # the record of earlier dense jobs
    with pytest.raises(ValidationError, match="sparse"):  # the same output folder is another job with --sparse
        run_local(JobSpec(m3_engine, write_input(tmp_path), output, options=EmbedOptions(sparse=True), quiet=True))


def test_sparse_needs_a_bge_m3_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, engine, _ = make_and_build(str(tmp_path / "build"), "plain", "bert", "embed", {}, {"target": "onnxruntime"})
    output = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"--sparse: .* is a 'embed' engine; .*'embed_m3' \(bge-m3\)"):
        run_local(JobSpec(Path(engine), write_input(tmp_path), output, options=EmbedOptions(sparse=True), quiet=True))
    assert not output.exists()  # refused before anything is written
    with pytest.raises(SystemExit):  # through a server there are no Parquet parts to hold the column
        cli.main(["embed", "--url", "http://127.0.0.1:9", "--input", str(write_input(tmp_path)), "--output", str(output), "--sparse"])
    assert "--sparse writes a column of a batch job's Parquet parts: give the engine with --engine" in capsys.readouterr().err
    assert not output.exists()
