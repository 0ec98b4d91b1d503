"""Calibration texts for post-training quantization: a local file, a Hugging Face dataset, or a built-in sample.

`load_calibration_texts(dataset, size, base_dir)` reads `quantization_config.calib_dataset`:

- None: `builtin_texts(size)` (bei/quantization/builtin_texts.py), a deterministic, diverse English sample generated here (no download);
- a local file (absolute, or relative to `base_dir` then the working directory):
  `.txt` (one text per line), `.jsonl` (field "text", else the first string field of each record),
  `.json` (a list of strings, or of records as in `.jsonl`);
- else a Hugging Face dataset id (`owner/name`): one `.jsonl` / `.parquet` (with pyarrow) / `.txt` /
  `.json` data file of the dataset repo, downloaded with `huggingface_hub`, or read from the cache when
  HF_HUB_OFFLINE is set.

Texts come back stripped, non-empty, in file order, at most `size` of them; cutting them to
`calib_max_seq_length` tokens is the caller's job. `heldout_texts(n, exclude)` gives texts for measuring
the accuracy of a quantized model that are not among the calibration texts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bei.backend import Batch
from bei.errors import CheckpointError, ConfigError, ExportError
from bei.kinds import Task
from bei.modeling.spec import ModelSpec
from bei.quantization.builtin_texts import builtin_texts, heldout_texts, short_texts
from bei.text.tokenizer import Encoded, TokenizerRuntime

FIELD = "trt_llm.build.quantization_config.calib_dataset"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
# data files of a dataset repo, in order of preference
HF_SUFFIXES = (".jsonl", ".parquet", ".txt", ".json")
TEXT_FIELDS = ("text", "content", "sentence", "document", "passage", "query", "question")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_calibration_texts(dataset: str | None, size: int, base_dir: Path | None = None) -> list[str]:
    """At most `size` calibration texts from `dataset` (see the module docstring)."""
    if size <= 0:
        raise ConfigError(f"trt_llm.build.quantization_config.calib_size: {size!r} must be > 0")
    if dataset is None or not dataset.strip():
        return builtin_texts(size)
    dataset = dataset.strip()
    local = _local_file(dataset, base_dir)
    if local is not None:
        texts = read_text_file(local, limit=size)
        where = str(local)
    elif _HF_ID.match(dataset) and not dataset.lower().endswith(LOCAL_SUFFIXES + (".parquet",)):
        path = _hf_dataset_file(dataset)
        texts = read_text_file(path, limit=size)
        where = f"HF dataset {dataset} ({path.name})"
    else:
        tried = ", ".join(str(c) for c in _candidates(dataset, base_dir))
        raise ConfigError(
            f"{FIELD}: {dataset!r} is neither an existing file (looked at: {tried}) nor a Hugging Face dataset id (owner/name)"
        )
    if not texts:
        raise ConfigError(f"{FIELD}: {where} holds no non-empty text")
    return texts


# --- local files ----------------------------------------------------------------------------
def _candidates(dataset: str, base_dir: Path | None) -> list[Path]:
    raw = Path(dataset).expanduser()
    if raw.is_absolute():
        return [raw]
    return [*([Path(base_dir) / raw] if base_dir is not None else []), Path.cwd() / raw]


def _local_file(dataset: str, base_dir: Path | None) -> Path | None:
    """The local file `dataset` names; None when it names none and may be an HF id; ConfigError when it
    clearly names a file (a known suffix, a path separator first) that does not exist."""
    candidates = _candidates(dataset, base_dir)
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
        if cand.is_dir():
            raise ConfigError(f"{FIELD}: {cand} is a folder; name a .txt, .jsonl or .json file in it")
    path_like = (
        dataset.lower().endswith(LOCAL_SUFFIXES + (".parquet",))
        or dataset.startswith(("/", ".", "~"))
        or "\\" in dataset
        or dataset.count("/") != 1
    )
    if path_like:
        tried = ", ".join(str(c) for c in candidates)
        raise ConfigError(f"{FIELD}: calibration file {dataset!r} not found (looked at: {tried})")
    return None


def read_text_file(path: Path, limit: int | None = None) -> list[str]:
    """Texts of a .txt / .jsonl / .json (/ .parquet with pyarrow) file; ConfigError naming the file on errors."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _take(_parquet_texts(path), limit)
        with path.open(encoding="utf-8") as fh:
            if suffix == ".jsonl":
                return _take(_jsonl_texts(fh, path), limit)
            if suffix == ".json":
                return _take(_json_texts(json.load(fh), path), limit)
            return _take((line for line in fh), limit)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{FIELD}: {path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{FIELD}: {path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise ConfigError(f"{FIELD}: cannot read {path}: {err}") from None


def _take(texts: Iterable[Any], limit: int | None) -> list[str]:
    out: list[str] = []
    for text in texts:
        if limit is not None and len(out) >= limit:
            break
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def _record_text(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in TEXT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
        for value in record.values():
            if isinstance(value, str):
                return value
    return None


def _jsonl_texts(lines: Iterable[str], path: Path) -> Iterable[str | None]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{FIELD}: {path} line {number} is not valid JSON: {err}") from None
        yield _record_text(record)


def _json_texts(data: Any, path: Path) -> list[str | None]:
    if isinstance(data, dict):  # {"text": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise ConfigError(f'{FIELD}: {path} must hold a JSON list of strings (or of records with a "text" field)')
    return [_record_text(item) for item in data]


def _parquet_texts(path: Path) -> Iterable[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{FIELD}: {path} is a parquet file and pyarrow is not installed") from None
    table = pq.read_table(path)
    names = [n for n in TEXT_FIELDS if n in table.column_names] or [
        f.name for f in table.schema if str(f.type) in ("string", "large_string")
    ]
    if not names:
        raise ConfigError(f"{FIELD}: {path} has no string column (columns: {', '.join(table.column_names)})")
    return (v for v in table.column(names[0]).to_pylist() if isinstance(v, str))


# --- Hugging Face datasets ------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    def on(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return on("HF_HUB_OFFLINE") or on("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _usable(files: Iterable[str]) -> list[str]:
    """Data files of a dataset repo that can be read, best first: preferred suffix, a train split, short path."""
    suffixes = [s for s in HF_SUFFIXES if s != ".parquet" or _has_pyarrow()]
    chosen = [f for f in files if f.lower().endswith(tuple(suffixes)) and not Path(f).name.startswith(".")]
    chosen = [f for f in chosen if Path(f).name.lower() not in ("dataset_info.json", "dataset_infos.json", "state.json", "config.json")]

    def rank(name: str) -> tuple[int, int, int, str]:
        suffix = next(i for i, s in enumerate(suffixes) if name.lower().endswith(s))
        return (suffix, 0 if "train" in name.lower() else 1, name.count("/"), name)

    return sorted(chosen, key=rank)


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_dataset_file(repo: str) -> Path:
    """One readable data file of the dataset repo `repo`, downloaded (or from the cache when offline)."""
    import huggingface_hub
    from huggingface_hub import errors as hf

    offline = _offline()
    kinds = ", ".join(s for s in HF_SUFFIXES if s != ".parquet" or _has_pyarrow())
    try:
        if offline:
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id=repo,
                    repo_type="dataset",
                    local_files_only=True,
                    allow_patterns=[f"*{s}" for s in HF_SUFFIXES],
                )
            )
            files = _usable(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            if not files:
                raise ConfigError(f"{FIELD}: the cached HF dataset {repo} has no {kinds} data file")
            return folder / files[0]
        files = _usable(huggingface_hub.list_repo_files(repo, repo_type="dataset"))
        if not files:
            raise ConfigError(f"{FIELD}: HF dataset {repo} has no {kinds} data file")
        return Path(huggingface_hub.hf_hub_download(repo, files[0], repo_type="dataset"))
    except ConfigError:
        raise
    except hf.LocalEntryNotFoundError as err:
        if offline:
            raise CheckpointError(
                f"{FIELD}: HF_HUB_OFFLINE is set and HF dataset {repo} is not in the cache; "
                "download it once online, or use a local .txt/.jsonl/.json file"
            ) from err
        raise CheckpointError(
            f"{FIELD}: cannot reach the HF hub to download dataset {repo} (network unreachable?): {err.__cause__ or err}"
        ) from err
    except (hf.RepositoryNotFoundError, hf.GatedRepoError) as err:
        raise CheckpointError(
            f"{FIELD}: HF dataset {repo} not found or not accessible (a private or gated dataset needs HF_TOKEN)"
        ) from err
    except hf.HFValidationError as err:
        raise ConfigError(f"{FIELD}: invalid HF dataset id {repo!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - network errors of many kinds
        raise CheckpointError(f"{FIELD}: cannot download HF dataset {repo}: {type(err).__name__}: {err}") from err


# --- batches of calibration and held-out texts ------------------------------------------------
def _cut(enc: Encoded, max_len: int) -> Encoded:
    """At most `max_len` tokens, the last (a closing special token, or a causal model's last token) kept."""
    if len(enc) <= max_len:
        return enc
    keep = list(range(max_len - 1)) + [len(enc) - 1]
    return Encoded(
        ids=[enc.ids[i] for i in keep],
        type_ids=[enc.type_ids[i] for i in keep],
        offsets=[enc.offsets[i] for i in keep],
        special=[enc.special[i] for i in keep],
        prompt_length=min(enc.prompt_length, max_len - 1),
    )


def encode_texts(spec: ModelSpec, tokenizer: TokenizerRuntime, texts: Sequence[str], max_seq_len: int) -> list[Encoded]:
    """Texts as the engine sees them, cut to `max_seq_len` tokens; rerankers get (text, next text) pairs."""
    if not texts:
        raise ExportError("no calibration texts")
    items: list[str | tuple[str, str]] = list(texts)
    if spec.task is Task.RERANK:
        items = [(texts[i], texts[(i + 1) % len(texts)]) for i in range(len(texts))]
    return [_cut(tokenizer.encode(item, truncate=True), max(2, max_seq_len)) for item in items]


def make_batches(spec: ModelSpec, tokenizer: TokenizerRuntime, texts: Sequence[str], max_seq_len: int, batch_size: int = 16) -> list[Batch]:
    """Padded batches of `texts`, sorted by length (less padding: the activation ranges are those of real tokens)."""
    encoded = sorted(encode_texts(spec, tokenizer, texts, max_seq_len), key=len)
    return [Batch.pad(encoded[i : i + batch_size], tokenizer.pad_id, spec.padding_side) for i in range(0, len(encoded), max(1, batch_size))]


def calibration_inputs(
    qcfg: Any, spec: ModelSpec, tokenizer: TokenizerRuntime, config_dir: Path | None, short: int = 0
) -> tuple[list[str], int, Batch]:
    """`quantization_config`'s calibration texts, their length cap, and the held-out batch the
    accuracy gate measures on (never calibration texts; with `short` queries of a few words, as
    `heldout_batch`)."""
    texts = load_calibration_texts(qcfg.calib_dataset, qcfg.calib_size, base_dir=config_dir)
    max_len = min(qcfg.calib_max_seq_length, spec.max_seq_len)
    return texts, max_len, heldout_batch(spec, tokenizer, texts, max_len, short=short)


def heldout_batch(
    spec: ModelSpec, tokenizer: TokenizerRuntime, calib_texts: Sequence[str], max_seq_len: int, n: int = 64, short: int = 0
) -> Batch:
    """One padded batch of `n` built-in texts that are not calibration texts, for `measure_accuracy`,
    and `short` queries of one to three words (`short_texts`)."""
    texts = heldout_texts(n, calib_texts) + short_texts(short)
    return make_batches(spec, tokenizer, texts, max_seq_len, batch_size=len(texts))[0]


def builtin_heldout_batch(qcfg: Any, spec: ModelSpec, tokenizer: TokenizerRuntime) -> Batch:
    """The held-out batch of a gate that calibrates nothing (the CPU int8 and bf16 engines): held-out
    texts that are not among the built-in calibration sample, cut to `calib_max_seq_length`."""
    max_len = min(qcfg.calib_max_seq_length, spec.max_seq_len)
    return heldout_batch(spec, tokenizer, builtin_texts(qcfg.calib_size), max_len)
