"""The input of a batch job: .txt (one text a line), .jsonl (a text field) and .parquet (a text column) files.

`plan_parts` streams over the input once (counting lines, reading Parquet footers) and cuts the whole
input, across files, into parts of `chunk_size` rows: part k holds the rows [k * chunk_size, ...). Each
part says where its rows are (byte offsets of text files, row offsets of Parquet files), so that any
process can read one part alone with `read_part`, in memory bounded by the part size.

Rows: every line of a .txt file (an empty line is an empty text); every non-blank line of a .jsonl file;
every row of a Parquet file. `row` numbers them across the files of a folder, in sorted path order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bei.errors import ValidationError

SUFFIXES = (".txt", ".jsonl", ".parquet")
READ_BATCH = 4096  # Parquet rows decoded at a time


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its text, its id and (`bei rerank` without --query) its query (.jsonl fields, Parquet columns)."""

    text: str = "text"
    id: str = "id"
    query: str = "query"


@dataclass(frozen=True)
class Segment:
    """`count` rows of one file, from `offset`: a byte offset (.txt, .jsonl) or a row offset (.parquet)."""

    path: str
    offset: int
    count: int


@dataclass(frozen=True)
class Part:
    index: int
    start: int  # global row of its first row
    segments: tuple[Segment, ...]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.segments)


@dataclass(frozen=True)
class Rows:
    """One part's texts, with their ids where the input has an id field (None where a record has none), and their
    queries where the job reads them (`bei rerank` without --query)."""

    texts: list[str]
    ids: list[Any] | None
    queries: list[str] | None = None


def input_files(path: Path) -> list[Path]:
    """The file itself, or every .txt / .jsonl / .parquet file under the folder, in sorted order."""
    if not path.exists():
        raise ValidationError(f"--input: {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValidationError(f"--input: {path} is not a {' / '.join(SUFFIXES)} file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith((".", "_")))
    if not files:
        raise ValidationError(f"--input: {path} holds no {' / '.join(SUFFIXES)} file")
    return files


def _row_starts(path: Path) -> Iterator[int]:
    """Byte offset of each row of a text file."""
    jsonl = path.suffix == ".jsonl"
    offset = 0
    with path.open("rb") as stream:
        for line in stream:
            if not jsonl or line.strip():
                yield offset
            offset += len(line)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def plan_parts(files: list[Path], chunk_size: int) -> list[Part]:
    """The whole input cut into parts of `chunk_size` rows (the last one shorter)."""
    if chunk_size < 1:
        raise ValidationError("--chunk-size must be positive")
    parts: list[Part] = []
    segments: list[Segment] = []
    held = 0  # rows in `segments`
    start = 0

    def close() -> None:
        nonlocal segments, held, start
        parts.append(Part(len(parts), start, tuple(segments)))
        start += held
        segments, held = [], 0

    for path in files:
        if path.suffix == ".parquet":
            total, position = _parquet_rows(path), 0
            while position < total:
                take = min(chunk_size - held, total - position)
                segments.append(Segment(str(path), position, take))
                held += take
                position += take
                if held == chunk_size:
                    close()
            continue
        first: int | None = None
        count = 0
        for offset in _row_starts(path):
            if first is None:
                first = offset
            count += 1
            if held + count == chunk_size:
                segments.append(Segment(str(path), first, count))
                held += count
                close()
                first, count = None, 0
        if count:
            assert first is not None
            segments.append(Segment(str(path), first, count))
            held += count
    if held:
        close()
    return parts


def id_type(files: list[Path], fields: Fields) -> Any:
    """The pyarrow type of the output's id column, None for no id column. The first record of the first file
    decides: a Parquet id column keeps its type; a .jsonl id that is an integer gives int64, any other a string."""
    import pyarrow as pa

    first = files[0]
    if first.suffix == ".txt":
        return None
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.ParquetFile(first).schema_arrow
        return schema.field(fields.id).type if fields.id in schema.names else None
    with first.open("rb") as stream:
        for line in stream:
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or fields.id not in record:
                    return None
                value = record[fields.id]
                return pa.int64() if isinstance(value, int) and not isinstance(value, bool) else pa.string()
    return None


def _text_rows(segment: Segment, fields: Fields, with_ids: bool, texts: list[str], ids: list[Any], queries: list[str] | None) -> None:
    path = Path(segment.path)
    jsonl = path.suffix == ".jsonl"
    with path.open("rb") as stream:
        stream.seek(segment.offset)
        taken = 0
        while taken < segment.count:
            raw = stream.readline()
            if not raw:
                raise ValidationError(f"--input: {path} changed since the job started (fewer rows than planned)")
            if jsonl and not raw.strip():
                continue
            taken += 1
            line = raw.decode("utf-8").rstrip("\r\n") if not jsonl else raw.decode("utf-8")
            if not jsonl:
                texts.append(line)
                continue
            record = json.loads(line)
            if queries is not None:
                if not isinstance(record, dict) or not isinstance(record.get(fields.query), str):
                    raise ValidationError(
                        f'--input: {path}: a record without a string "{fields.query}" field (--query-field), and no --query: '
                        f"{line.strip()[:200]}"
                    )
                queries.append(record[fields.query])
            if isinstance(record, str):
                texts.append(record)
                ids.append(None)
                continue
            if not isinstance(record, dict) or not isinstance(record.get(fields.text), str):
                raise ValidationError(f'--input: {path}: a record without a string "{fields.text}" field: {line.strip()[:200]}')
            texts.append(record[fields.text])
            if with_ids:
                ids.append(record.get(fields.id))


def _parquet_segment(segment: Segment, fields: Fields, with_ids: bool, texts: list[str], ids: list[Any], queries: list[str] | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(segment.path)
    names = source.schema_arrow.names
    wanted = [fields.text] + ([fields.query] if queries is not None else [])
    for name in wanted:
        if name not in names:
            raise ValidationError(f"--input: {segment.path} has no column {name!r} (it has {', '.join(names)})")
    columns = wanted + ([fields.id] if with_ids and fields.id in names else [])
    end = segment.offset + segment.count
    groups: list[int] = []
    first = row = 0
    for group in range(source.metadata.num_row_groups):  # only the row groups that overlap the segment
        n = source.metadata.row_group(group).num_rows
        if row + n > segment.offset and row < end:
            if not groups:
                first = row
            groups.append(group)
        row += n
    if not groups:
        raise ValidationError(f"--input: {segment.path} changed since the job started (fewer rows than planned)")
    pieces = []  # record batches, sliced to the segment: memory of the segment plus one batch, however big the row groups
    position = first
    for batch in source.iter_batches(batch_size=READ_BATCH, row_groups=groups, columns=columns):
        lo, hi = max(segment.offset, position), min(end, position + batch.num_rows)
        if hi > lo:
            pieces.append(batch.slice(lo - position, hi - lo))
        position += batch.num_rows
        if position >= end:
            break
    table = pa.Table.from_batches(pieces, schema=pieces[0].schema if pieces else None)
    if table.num_rows != segment.count:
        raise ValidationError(f"--input: {segment.path} changed since the job started (fewer rows than planned)")
    for name, into in ((fields.text, texts), (fields.query, queries)):
        if into is None:
            continue
        column = table.column(name).to_pylist()
        if any(not isinstance(t, str) for t in column):
            raise ValidationError(f"--input: {segment.path}: column {name!r} holds a value that is not a string")
        into.extend(column)
    if with_ids:
        ids.extend(table.column(fields.id).to_pylist() if fields.id in table.column_names else [None] * segment.count)


def read_part(part: Part, fields: Fields, with_ids: bool, with_queries: bool = False) -> Rows:
    """One part's rows; `with_queries`: each row's query too (`fields.query`; a .txt file has none)."""
    texts: list[str] = []
    ids: list[Any] = []
    queries: list[str] | None = [] if with_queries else None
    for segment in part.segments:
        if segment.path.endswith(".parquet"):
            _parquet_segment(segment, fields, with_ids, texts, ids, queries)
        else:
            if queries is not None and segment.path.endswith(".txt"):
                raise ValidationError(f"--input: {segment.path} is a .txt file, which holds no queries: give --query")
            _text_rows(segment, fields, with_ids, texts, ids, queries)
            if with_ids and segment.path.endswith(".txt"):
                ids.extend([None] * segment.count)
    return Rows(texts, ids if with_ids else None, queries)
