"""Causal rerankers scored through a chat template (Qwen3-Reranker "-seq" style) vs sentence-transformers.

sentence-transformers 6.2's CrossEncoder renders a (query, document) pair through the tokenizer's chat
template whenever the checkpoint has one (chat_template.jinja, else tokenizer_config.json's
`chat_template`): messages with roles "query" and "document", `add_generation_prompt=False`, tokenized
without special tokens; a truncated input gets the template's suffix written back over its last tokens.
bei renders the same ids server-side (bei/text/chat_template.py); these tests compare the ids, and
the /rerank and /predict scores of a built engine served by a real uvicorn, with `CrossEncoder.predict`.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from tokenizers import Tokenizer

from bei.build import build_engine
from bei.config import parse_config
from bei.engine.manifest import read_manifest
from bei.modeling.detect import read_model_spec
from bei.progress import Progress
from bei.testing.inproc_server import serve_engine
from bei.testing.tiny_models import TEXTS, make_checkpoint
from bei.text.chat_template import ChatTemplate, read_chat_template, read_special_tokens
from bei.text.tokenizer import TokenizerRuntime

TOL = 1e-4
MAX_LEN = 128  # the tiny models' positions; the template alone takes ~65 tokens of the tiny vocabulary

# Qwen3-Reranker-seq style: system prompt, <Query>/<Document> from the "query"/"document" roles, assistant prefix
RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\n"
    '<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}\n'
    '<Document>: {{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}'
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
# structured content (content[0].text) and a special-token variable: the other message format ST infers
STRUCTURED_TEMPLATE = (
    "{{ bos_token }}system\n{% for m in messages %}{% if m.role == 'query' %}<Query>: {{ m.content[0].text }}\n"
    "{% elif m.role == 'document' %}<Document>: {{ m.content[0].text }}\n"
    "{% else %}{{ m.role }}: {{ m.content[0].text }}\n{% endif %}{% endfor %}<|im_end|>\n{{ eos_token }}"
)
# a chat model's stock template: only system/user/assistant reach the prompt (ST refuses pairs with it)
STOCK_TEMPLATE = (
    "{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QUERY = "What is the capital of France?"
_WORDS = " ".join(TEXTS).split()


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


LONG_DOC = _words(200, 1)  # far over MAX_LEN once rendered
PAIRS: list[tuple[str, str]] = [(QUERY, t) for t in TEXTS] + [(_words(4, 2), _words(n, 3 + n)) for n in (1, 8, 20)]


def _set_template(folder: Path, template: str | None, where: str) -> None:
    """Put `template` into chat_template.jinja or tokenizer_config.json (and remove it from the other)."""
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    if template is not None:
        if where == "jinja":
            (folder / "chat_template.jinja").write_text(template)
        else:
            config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3ForSequenceClassification (num_labels=1), no chat template: copy before changing."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3-rerank") / "base", "qwen3", "rerank")


def _copy(base: Path, dest: Path, template: str | None, where: str = "jinja") -> Path:
    shutil.copytree(base, dest)
    _set_template(dest, template, where)
    return dest


def _cross_encoder(folder: Path) -> CrossEncoder:
    return CrossEncoder(str(folder), device="cpu", max_length=MAX_LEN)


def _st_ids(model: CrossEncoder, items: list[Any]) -> list[list[int]]:
    """The token ids sentence-transformers feeds the model, padding removed."""
    features = model[0].preprocess(items)
    return [
        [i for i, m in zip(row, mask, strict=False) if m]
        for row, mask in zip(features["input_ids"].tolist(), features["attention_mask"].tolist(), strict=False)
    ]


def _build(checkpoint: Path, root: Path, name: str) -> Path:
    config = {
        "model_name": name,
        "trt_llm": {
            "build": {
                "base_model": "encoder",
                "max_seq_len": MAX_LEN,
                "checkpoint_repository": {"source": "LOCAL", "repo": str(checkpoint)},
                "cpu_precision": "fp32",  # the fp32 engine its reference is compared with
            }
        },
    }
    result = build_engine(parse_config(config), config_dir=root, engines_root=root / "engines", progress=Progress([], enabled=False))
    return result.engine_dir


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    return response.json()


def _close(got: Any, want: Any, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e} > {TOL:.0e}\n got {got}\nwant {want}"


# --- what counts as a chat template -----------------------------------------------------------
def test_detects_template_where_sentence_transformers_reads_it(base_checkpoint: Path, tmp_path: Path) -> None:
    jinja = _copy(base_checkpoint, tmp_path / "jinja", RERANK_TEMPLATE, "jinja")
    in_config = _copy(base_checkpoint, tmp_path / "config", RERANK_TEMPLATE, "config")
    both = _copy(base_checkpoint, tmp_path / "both", STRUCTURED_TEMPLATE, "config")
    (both / "chat_template.jinja").write_text(RERANK_TEMPLATE)  # the .jinja file wins over tokenizer_config.json
    none = _copy(base_checkpoint, tmp_path / "none", None)
    for folder, want in ((jinja, RERANK_TEMPLATE), (in_config, RERANK_TEMPLATE), (both, RERANK_TEMPLATE), (none, None)):
        assert read_model_spec(folder).chat_template == want, folder.name
        processor = _cross_encoder(folder)[0].processor
        assert processor.chat_template == want, f"{folder.name}: not the template ST reads"
        assert read_chat_template(folder) == want


def test_template_only_for_causal_sequence_classification(tiny_checkpoint_factory: Any, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    shutil.copytree(tiny_checkpoint_factory("bert", "rerank"), bert)
    _set_template(bert, RERANK_TEMPLATE, "jinja")
    assert read_model_spec(bert).chat_template is None, "BERT-like cross-encoders keep their [SEP] pairs"
    classify = tmp_path / "classify"
    shutil.copytree(tiny_checkpoint_factory("qwen3", "classify"), classify)
    _set_template(classify, RERANK_TEMPLATE, "jinja")
    assert read_model_spec(classify).chat_template == RERANK_TEMPLATE
    embed = tmp_path / "embed"
    shutil.copytree(tiny_checkpoint_factory("qwen3", "embed"), embed)
    _set_template(embed, RERANK_TEMPLATE, "jinja")
    assert read_model_spec(embed).chat_template is None


def test_stock_chat_template_keeps_plain_pairs(base_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(base_checkpoint, tmp_path / "stock", STOCK_TEMPLATE)
    assert ChatTemplate(STOCK_TEMPLATE).pair_roles_failure() is not None
    with pytest.raises(ValueError, match="cannot carry a 'query'/'document' pair"):
        _cross_encoder(folder).predict([(QUERY, TEXTS[3])])  # ST refuses the pair outright
    assert read_model_spec(folder).chat_template is None  # bei: scored as the plain pair it was trained on


def test_special_tokens_as_transformers_reads_them(base_checkpoint: Path) -> None:
    processor = _cross_encoder(base_checkpoint)[0].processor
    assert read_special_tokens(base_checkpoint) == processor.special_tokens_map


# --- token ids -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template,where",
    [(RERANK_TEMPLATE, "jinja"), (RERANK_TEMPLATE, "config"), (STRUCTURED_TEMPLATE, "jinja")],
    ids=["flat-jinja", "flat-config", "structured"],
)
def test_token_ids_match_sentence_transformers(base_checkpoint: Path, tmp_path: Path, template: str, where: str) -> None:
    folder = _copy(base_checkpoint, tmp_path / "ckpt", template, where)
    model = _cross_encoder(folder)
    runtime = TokenizerRuntime(folder / "tokenizer.json", MAX_LEN, chat_template=template)
    assert runtime.chat_template is not None
    assert runtime.chat_template.format == model[0].input_formatter.message_format
    # pairs (some truncated, with the suffix restored), and single texts (rendered as a "user" message)
    items: list[Any] = [*PAIRS, (QUERY, LONG_DOC), (LONG_DOC, TEXTS[0]), TEXTS[1], LONG_DOC]
    want = _st_ids(model, items)
    got = [runtime.encode(item, truncate=True).ids for item in items]
    for item, g, w in zip(items, got, want, strict=False):
        assert g == w, f"{item!r}: {len(g)} ids {g[-12:]} != ST's {len(w)} ids {w[-12:]}"
    assert max(len(w) for w in want) == MAX_LEN, "no input was truncated"


def test_truncation_keeps_the_template_suffix(base_checkpoint: Path, tmp_path: Path) -> None:
    from bei.errors import InputTooLongError

    folder = _copy(base_checkpoint, tmp_path / "ckpt", RERANK_TEMPLATE)
    runtime = TokenizerRuntime(folder / "tokenizer.json", MAX_LEN, chat_template=RERANK_TEMPLATE)
    with pytest.raises(InputTooLongError):
        runtime.encode((QUERY, LONG_DOC), truncate=False)
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # the template tail after the document (from <|im_end|> on), as it ends an untruncated input
    short = runtime.encode((QUERY, TEXTS[0])).ids
    tail = short[short.index(plain.token_to_id("<|im_end|>"), len(short) - 30) :]
    assert len(tail) > 5
    right = runtime.encode((QUERY, LONG_DOC), truncate=True).ids
    assert len(right) == MAX_LEN and right[-len(tail) :] == tail
    head = plain.encode(RERANK_TEMPLATE.split("<Query>")[0], add_special_tokens=False).ids
    assert right[: len(head)] == head
    left = runtime.encode((QUERY, LONG_DOC), truncate=True, direction="left").ids
    assert len(left) == MAX_LEN and left[-len(tail) :] == tail


def test_without_template_pairs_stay_plain(base_checkpoint: Path) -> None:
    runtime = TokenizerRuntime(base_checkpoint / "tokenizer.json", MAX_LEN)
    plain = Tokenizer.from_file(str(base_checkpoint / "tokenizer.json"))
    for query, doc in PAIRS:
        assert runtime.encode((query, doc)).ids == plain.encode(query, doc, add_special_tokens=True).ids
    assert _st_ids(_cross_encoder(base_checkpoint), PAIRS) == [runtime.encode(p).ids for p in PAIRS]


# --- served engines ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def templated(base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("templated")
    checkpoint = _copy(base_checkpoint, root / "checkpoint", RERANK_TEMPLATE)
    engine = _build(checkpoint, root, "qwen3-rerank-chat")
    with serve_engine(engine) as url:
        yield checkpoint, engine, url


@pytest.fixture(scope="module")
def plain(base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("plain")
    engine = _build(base_checkpoint, root, "qwen3-rerank-plain")
    with serve_engine(engine) as url:
        yield base_checkpoint, engine, url


def _check_scores(checkpoint: Path, url: str, pairs: list[tuple[str, str]], truncate: bool, what: str) -> None:
    model = _cross_encoder(checkpoint)
    want = model.predict(pairs, convert_to_numpy=True)  # sigmoid of the one logit (ST's default activation)
    want_raw = model.predict(pairs, convert_to_numpy=True, activation_fn=torch.nn.Identity())
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for query in sorted({q for q, _ in pairs}):
            index = [i for i, (q, _) in enumerate(pairs) if q == query]
            texts = [pairs[i][1] for i in index]
            rerank = _post(client, "/rerank", {"query": query, "texts": texts, "truncate": truncate})
            _close([r["score"] for r in rerank], want[index], f"{what} /rerank")
            raw = _post(client, "/rerank", {"query": query, "texts": texts, "truncate": truncate, "raw_scores": True})
            _close([r["score"] for r in raw], want_raw[index], f"{what} /rerank raw_scores")
        predict = _post(client, "/predict", {"inputs": [[q, d] for q, d in pairs], "truncate": truncate})
        _close([row[0]["score"] for row in predict], want, f"{what} /predict")
        raw = _post(client, "/predict", {"inputs": [[q, d] for q, d in pairs], "truncate": truncate, "raw_scores": True})
        _close([row[0]["score"] for row in raw], want_raw, f"{what} /predict raw_scores")


def test_served_scores_match_cross_encoder(templated: tuple[Path, Path, str]) -> None:
    checkpoint, engine, url = templated
    assert read_manifest(engine).chat_template == RERANK_TEMPLATE
    scores = _cross_encoder(checkpoint).predict(PAIRS, convert_to_numpy=True)
    assert scores.std() > 1e-3, f"the reference scores hardly vary: {scores}"
    _check_scores(checkpoint, url, PAIRS, truncate=False, what="chat template")


def test_served_truncation(templated: tuple[Path, Path, str]) -> None:
    checkpoint, _, url = templated
    pairs = [(QUERY, LONG_DOC), (QUERY, TEXTS[3]), (_words(60, 9), TEXTS[1])]
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for path, body in (("/rerank", {"query": QUERY, "texts": [LONG_DOC]}), ("/predict", {"inputs": [[QUERY, LONG_DOC]]})):
            for truncate in ({}, {"truncate": False}):
                response = client.post(path, json={**body, **truncate})
                assert response.status_code == 422, f"{path} {truncate}: {response.status_code} {response.text}"
                assert "longer than the model's limit" in response.text
    # truncate: true scores what ST scores: the ids cut to the limit with the template suffix written back
    _check_scores(checkpoint, url, pairs, truncate=True, what="chat template, truncated")


def test_served_without_template_keeps_plain_pairs(plain: tuple[Path, Path, str]) -> None:
    checkpoint, engine, url = plain
    assert read_manifest(engine).chat_template is None
    _check_scores(checkpoint, url, PAIRS, truncate=False, what="no chat template")
