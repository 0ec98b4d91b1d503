"""The output folder of a batch job: `_bei_job.json` (what the job is) and `part-NNNNNN.parquet` files (`row`, then
`embedding` or `score`, a bge-m3 job's `sparse` with --sparse, and `id`).

Each part is written to a hidden temporary file and renamed into place, so a part file that exists is
complete: a rerun of the same job keeps the parts it finds and computes the missing ones. The job record
makes sure that a rerun is the same job (same input, part size, engine and options).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bei.errors import ValidationError

JOB_FILE = "_bei_job.json"


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def done_parts(output: Path) -> set[int]:
    """Indices of the part files present in `output`."""
    found = set()
    for path in output.glob("part-*.parquet"):
        stem = path.name[len("part-") : -len(".parquet")]
        if stem.isdigit():
            found.add(int(stem))
    return found


def prepare_output(output: Path, job: dict[str, Any], *, overwrite: bool) -> None:
    """Create `output`, or check that the job it holds is this one; drop temporary files of a killed run."""
    if output.exists() and not output.is_dir():
        raise ValidationError(f"--output: {output} is a file; with --engine, --output is a folder of Parquet parts")
    output.mkdir(parents=True, exist_ok=True)
    record = output / JOB_FILE
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != job:
            if not overwrite:
                changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
                raise ValidationError(
                    f"--output: {output} holds the parts of another job (it differs in {', '.join(changed)}): "
                    "use another folder, or --overwrite to start over there"
                )
            for path in output.glob("part-*.parquet"):
                path.unlink()
    elif done_parts(output):
        raise ValidationError(f"--output: {output} holds part files but no {JOB_FILE}: use another folder")
    for stale in output.glob(".part-*.tmp-*"):
        stale.unlink(missing_ok=True)
    temporary = output / f".{JOB_FILE}.tmp-{uuid.uuid4().hex}"
    temporary.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, record)


def _id_array(ids: list[Any], id_type: Any) -> Any:
    """The id column in the job's id type (the first record's): every part has the same schema."""
    import pyarrow as pa

    if id_type == pa.string():
        ids = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in ids]
    elif id_type == pa.int64() and not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in ids):
        raise ValidationError(
            "--id-field: the first record's id is an integer, a later one is not: ids must be all integers or all strings"
        )
    try:
        return pa.array(ids, type=id_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValidationError(f"--id-field: an id is not of the first record's id type {id_type}: {err}") from None


def _values_array(values: np.ndarray) -> Any:
    """float32 [rows] -> a float32 column; float32 [rows, dim] -> a list<float32> column."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1:
        return pa.array(values, type=pa.float32())
    count, dim = values.shape
    offsets = pa.array(np.arange(0, count * dim + 1, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.float32()))


def sparse_array(weights: list[list[tuple[int, float]]]) -> Any:
    """Per row, its (token id, weight) pairs -> a list<struct<index: int32, value: float32>> column."""
    import pyarrow as pa

    struct = pa.struct([("index", pa.int32()), ("value", pa.float32())])  # /embed_sparse's {index, value}
    return pa.array([[{"index": i, "value": v} for i, v in row] for row in weights], type=pa.list_(struct))


def write_part(output: Path, index: int, start: int, values: dict[str, Any], ids: list[Any] | None, id_type: Any = None) -> Path:
    """Write part `index` (rows `start`, `start + 1`, ...) atomically: temporary file, then rename. `values`: the
    columns after `row` (a vector or a score a row as numpy arrays, or pyarrow arrays), `ids` in `id_type`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: _values_array(v) if isinstance(v, np.ndarray) else v for name, v in values.items()}
    count = len(next(iter(arrays.values())))
    columns: dict[str, Any] = {"row": pa.array(np.arange(start, start + count, dtype=np.int64)), **arrays}
    if ids is not None:
        columns["id"] = _id_array(ids, id_type)
    table = pa.table(columns)
    final = output / part_name(index)
    temporary = output / f".{final.name}.tmp-{uuid.uuid4().hex}"
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return final


def read_output(output: Path) -> Any:
    """Every part of `output` as one pyarrow table, sorted by `row` (tests, and users checking a job)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(output / part_name(i)) for i in sorted(done_parts(output))]
    if not tables:
        return pa.table({"row": pa.array([], pa.int64())})
    return pa.concat_tables(tables, promote_options="permissive").sort_by("row")
