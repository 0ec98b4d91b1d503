"""Calibration texts for post-training quantization: a local file, a Hugging Face dataset, or a built-in sample.

`load_calibration_texts(dataset, size, base_dir)` reads `quantization_config.calib_dataset`:

- None: `builtin_texts(size)`, a deterministic, diverse English sample generated here (no download);
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
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bei.backend import Batch
from bei.errors import CheckpointError, ConfigError, ExportError
from bei.kinds import Task
from bei.modeling.spec import ModelSpec
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


# --- built-in sample ------------------------------------------------------------------------
_TOPICS: dict[str, dict[str, list[str]]] = {
    "science": {
        "subjects": [
            "the telescope",
            "a team of physicists",
            "the new vaccine",
            "this enzyme",
            "the Mars rover",
            "a quantum computer",
            "the research group",
            "the climate model",
            "a biologist",
            "the satellite",
        ],
        "verbs": [
            "measured",
            "discovered",
            "predicts",
            "explains",
            "detected",
            "simulates",
            "confirmed",
            "analyzed",
            "observed",
            "reduced",
        ],
        "objects": [
            "the spectrum of a distant star",
            "a protein that folds in milliseconds",
            "the rate of ocean warming",
            "signals from deep space",
            "the structure of the cell membrane",
            "the mass of the neutrino",
            "a new species of frog",
            "carbon levels in the atmosphere",
            "the error rate of the qubits",
            "traces of water ice",
        ],
    },
    "cooking": {
        "subjects": [
            "the chef",
            "my grandmother",
            "this recipe",
            "the bakery on the corner",
            "a good cook",
            "the restaurant",
            "our neighbour",
            "the cookbook",
            "the pastry team",
            "a street vendor",
        ],
        "verbs": ["prepares", "bakes", "recommends", "serves", "roasts", "seasons", "slices", "simmers", "mixes", "grills"],
        "objects": [
            "fresh bread with olive oil",
            "a spicy tomato soup",
            "the vegetables for twenty minutes",
            "a lemon tart with almond crust",
            "rice with saffron and peas",
            "the dough overnight",
            "garlic, onions and a pinch of salt",
            "chicken with rosemary",
            "a bowl of ramen",
            "chocolate cake for the party",
        ],
    },
    "finance": {
        "subjects": [
            "the central bank",
            "investors",
            "the company",
            "the quarterly report",
            "the startup",
            "the pension fund",
            "analysts",
            "the market",
            "the board",
            "a small business",
        ],
        "verbs": ["raised", "expects", "reported", "cut", "announced", "forecasts", "reviewed", "lost", "doubled", "invested in"],
        "objects": [
            "interest rates by a quarter point",
            "revenue growth of 12 percent",
            "its annual dividend",
            "a loss of 3.5 million dollars",
            "new bonds worth 400 million euros",
            "the price of oil",
            "inflation near two percent",
            "the merger with its rival",
            "costs in the second quarter",
            "renewable energy projects",
        ],
    },
    "technology": {
        "subjects": [
            "the search engine",
            "the new phone",
            "our database",
            "the compiler",
            "this library",
            "the cloud service",
            "the operating system",
            "a language model",
            "the router",
            "the app",
        ],
        "verbs": ["indexes", "supports", "stores", "optimizes", "crashed on", "encrypts", "downloads", "updates", "ranks", "caches"],
        "objects": [
            "millions of documents per day",
            "the user's settings",
            "queries in under ten milliseconds",
            "large files over a slow network",
            "embeddings for semantic search",
            "every security patch",
            "images in the background",
            "the results by relevance",
            "requests from mobile devices",
            "the configuration file",
        ],
    },
    "sports": {
        "subjects": [
            "the home team",
            "the goalkeeper",
            "the coach",
            "a young sprinter",
            "the champion",
            "the referee",
            "both teams",
            "the captain",
            "the tennis player",
            "the cyclist",
        ],
        "verbs": ["won", "lost", "scored", "trained for", "defended", "finished", "celebrated", "missed", "broke", "prepared for"],
        "objects": [
            "the final by two goals",
            "a penalty in the last minute",
            "the world record",
            "the marathon in under three hours",
            "the title for the third time",
            "the second set",
            "a difficult mountain stage",
            "the match on Sunday",
            "the season opener",
            "a free kick",
        ],
    },
    "travel": {
        "subjects": [
            "the train",
            "our flight",
            "the hotel",
            "a tourist",
            "the museum",
            "the ferry",
            "the tour guide",
            "the old town",
            "the airport",
            "the campsite",
        ],
        "verbs": [
            "leaves",
            "arrives at",
            "offers",
            "closes",
            "welcomes",
            "connects",
            "shows",
            "overlooks",
            "was delayed by",
            "is close to",
        ],
        "objects": [
            "the station at 7:45",
            "a view of the harbour",
            "visitors from all over the world",
            "the islands twice a day",
            "the lake and the mountains",
            "two hours because of the storm",
            "a collection of medieval maps",
            "free breakfast and parking",
            "the cathedral",
            "the beach",
        ],
    },
    "health": {
        "subjects": [
            "the doctor",
            "regular exercise",
            "the hospital",
            "a balanced diet",
            "the nurse",
            "the study",
            "good sleep",
            "the clinic",
            "the patient",
            "the pharmacist",
        ],
        "verbs": ["recommends", "improves", "treated", "lowers", "monitors", "suggests", "reduces", "helps", "explained", "prescribed"],
        "objects": [
            "blood pressure in older adults",
            "the risk of heart disease",
            "a short walk after dinner",
            "the symptoms of the flu",
            "two tablets a day",
            "stress and anxiety",
            "the results of the test",
            "more vegetables and less sugar",
            "a follow-up visit next week",
            "memory and concentration",
        ],
    },
}
_TIMES = [
    "yesterday",
    "last week",
    "on Monday",
    "this morning",
    "in 2023",
    "next year",
    "every summer",
    "after the meeting",
    "before noon",
    "in the evening",
    "during the holidays",
    "twice a month",
]
_PLACES = [
    "in Paris",
    "in Tokyo",
    "in a small village",
    "near the river",
    "in New York",
    "at the university",
    "in the north of Italy",
    "on the coast",
    "in Berlin",
    "in the city centre",
    "in Nairobi",
    "in Toronto",
]
_QUESTIONS = ["Why", "How", "When", "Where", "How often", "Under which conditions"]
_INSTRUCTIONS = [
    "Explain how",
    "Describe why",
    "Summarize the report in which",
    "Find documents where",
    "Write a short note saying that",
    "Check whether",
]
_CONNECTORS = ["because", "although", "while", "after", "so", "and"]


def _sentence(rng: random.Random, topic: dict[str, list[str]]) -> str:
    return f"{rng.choice(topic['subjects'])} {rng.choice(topic['verbs'])} {rng.choice(topic['objects'])}"


def _text(rng: random.Random, kind: int) -> str:
    topic = _TOPICS[rng.choice(sorted(_TOPICS))]
    other = _TOPICS[rng.choice(sorted(_TOPICS))]
    s = _sentence(rng, topic)
    if kind == 0:
        return f"{s[0].upper()}{s[1:]} {rng.choice(_PLACES)}."
    if kind == 1:
        q = rng.choice(_QUESTIONS)
        return f"{q} {s.replace(' ', ' really ', 1) if rng.random() < 0.2 else s} {rng.choice(_TIMES)}?"
    if kind == 2:
        return f"{rng.choice(_INSTRUCTIONS)} {s}."
    if kind == 3:
        t = rng.choice(_TIMES)
        return (
            f"{t[0].upper()}{t[1:]}, {s} {rng.choice(_CONNECTORS)} {_sentence(rng, other)}; about {rng.randint(2, 98)}% of readers agreed."
        )
    if kind == 4:  # a short paragraph
        parts = [_sentence(rng, rng.choice([topic, other])) for _ in range(rng.randint(3, 6))]
        return " ".join(f"{p[0].upper()}{p[1:]}." for p in parts)
    if kind == 5:  # search-style query
        content = [w for w in s.split() if len(w) > 3]
        keep = sorted(rng.sample(range(len(content)), k=min(len(content), rng.randint(2, 5))))
        return " ".join(content[i] for i in keep) + " " + rng.choice(_PLACES).split(" ", 1)[1]
    # a quote with numbers and punctuation
    return (
        f'"{s[0].upper()}{s[1:]}," said {rng.choice(["Dr. Lee", "Maria", "the spokesperson", "Ahmed", "Ms. Novak"])} '
        f"on {rng.choice(['3 May', '12 June', '1 October', '24 December'])} -- "
        f"{rng.randint(1, 999)} people, {rng.randint(1, 60)} minutes."
    )


def _generate(seed: int, count: int, exclude: set[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude or ())
    attempts = 0
    while len(out) < count and attempts < count * 50:
        attempts += 1
        text = _text(rng, len(out) % 7)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


BUILTIN_SEED = 20240611
HELDOUT_SEED = 777


def builtin_texts(size: int = 512) -> list[str]:
    """`size` distinct English texts (sentences, questions, queries, short paragraphs) over seven topics;
    the same on every call and machine."""
    return _generate(BUILTIN_SEED, size)


def heldout_texts(n: int = 32, exclude: Iterable[str] = ()) -> list[str]:
    """`n` texts for accuracy measurement, none of them in `exclude` (the calibration texts)."""
    return _generate(HELDOUT_SEED, n, set(exclude) | set(builtin_texts(2048)))


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


def calibration_inputs(qcfg: Any, spec: ModelSpec, tokenizer: TokenizerRuntime, config_dir: Path | None) -> tuple[list[str], int, Batch]:
    """`quantization_config`'s calibration texts, their length cap, and the held-out batch the
    accuracy gate measures on (never calibration texts)."""
    texts = load_calibration_texts(qcfg.calib_dataset, qcfg.calib_size, base_dir=config_dir)
    max_len = min(qcfg.calib_max_seq_length, spec.max_seq_len)
    return texts, max_len, heldout_batch(spec, tokenizer, texts, max_len)


def heldout_batch(spec: ModelSpec, tokenizer: TokenizerRuntime, calib_texts: Sequence[str], max_seq_len: int, n: int = 64) -> Batch:
    """One padded batch of `n` built-in texts that are not calibration texts, for `measure_accuracy`."""
    return make_batches(spec, tokenizer, heldout_texts(n, calib_texts), max_seq_len, batch_size=n)[0]
