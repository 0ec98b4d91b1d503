"""`bei embed` and `bei rerank`: files in, files out, through bei.client against any bei/BEI/TEI server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bei.client import Client
from bei.errors import ValidationError

CHUNK = 256  # texts per progress step


def read_texts(path: Path) -> list[str]:
    """A .txt file (one text per line) or a .jsonl file (a "text" field, or a plain JSON string per line)."""
    if not path.exists():
        raise ValidationError(f"--input: {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        item = json.loads(line)
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise ValidationError(f'--input: {path}:{number} has no "text" field')
    return texts


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def _write(path: Path, rows: list[dict[str, Any]] | np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, np.asarray(rows))
        return
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row.tolist() if isinstance(row, np.ndarray) else row) + "\n")


def embed_file(
    url: str, source: Path, target: Path, *, batch_size: int, concurrency: int, model: str | None, api_key: str | None = None
) -> int:
    texts = read_texts(source)
    parts = []
    with Client(url, batch_size=batch_size, max_concurrency=concurrency, model=model, api_key=api_key) as client:
        for start in range(0, len(texts), CHUNK):
            parts.append(client.embed(texts[start : start + CHUNK]))
            _progress(min(start + CHUNK, len(texts)), len(texts))
    print(file=sys.stderr)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    _write(target, vectors if target.suffix == ".npy" else [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)])
    return len(texts)


def rerank_file(url: str, query: str, source: Path, target: Path, *, batch_size: int, concurrency: int, api_key: str | None = None) -> int:
    texts = read_texts(source)
    scores: list[np.ndarray] = []
    with Client(url, batch_size=batch_size, max_concurrency=concurrency, api_key=api_key) as client:
        for start in range(0, len(texts), CHUNK):
            scores.append(client.rerank(query, texts[start : start + CHUNK]))
            _progress(min(start + CHUNK, len(texts)), len(texts))
    print(file=sys.stderr)
    flat = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    _write(
        target,
        flat
        if target.suffix == ".npy"
        else [{"index": i, "score": float(s), "text": t} for i, (s, t) in enumerate(zip(flat, texts, strict=True))],
    )
    return len(texts)
