"""Token-classification (NER) engines: /predict_tokens.

`aggregation_strategy: none` answers every token with the scores of every label (BEI's format);
`simple`, `first`, `average` and `max` group tokens into entities exactly as transformers'
token-classification pipeline does (same sub-word rule, same grouping, "O" left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.schemas import PredictTokensRequest
from bei.api.scoring import activate, check_count, predict_items
from bei.errors import ValidationError
from bei.inference import InferenceService
from bei.text.tokenizer import Encoded, TokenizerRuntime

IGNORED_LABELS = ("O",)


@dataclass
class _Token:
    word: str
    scores: np.ndarray
    start: int
    end: int
    is_subword: bool


def _tokens(text: str, enc: Encoded, scores: np.ndarray, tokenizer: TokenizerRuntime) -> list[_Token]:
    """The pipeline's `gather_pre_entities`: special tokens dropped, sub-words marked."""
    word_aware = bool(tokenizer.continuing_subword_prefix)
    unk = tokenizer.unk_id
    out: list[_Token] = []
    for idx, token_id in enumerate(enc.ids):
        if enc.special[idx]:
            continue
        word = tokenizer.id_to_token(token_id) or ""
        start, end = enc.offsets[idx]
        word_ref = text[start:end]
        if word_aware:
            is_subword = len(word) != len(word_ref)
        else:
            is_subword = start > 0 and " " not in text[start - 1 : start + 1]
        if token_id == unk:
            word, is_subword = word_ref, False
        out.append(_Token(word, scores[idx], start, end, is_subword))
    return out


def _entity(label: str, score: float, word: str, start: int, end: int) -> dict[str, Any]:
    return {"entity": label, "score": score, "word": word, "start": start, "end": end}


def _aggregate_word(group: list[_Token], strategy: str, labels: list[str], tokenizer: TokenizerRuntime) -> dict[str, Any]:
    word = tokenizer.decode_tokens([t.word for t in group])
    if strategy == "first":
        scores = group[0].scores
    elif strategy == "max":
        scores = max(group, key=lambda t: t.scores.max()).scores
    else:  # average
        scores = np.nanmean(np.stack([t.scores for t in group]), axis=0)
    idx = int(scores.argmax())
    return _entity(labels[idx], float(scores[idx]), word, group[0].start, group[-1].end)


def _tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _group(entities: list[dict[str, Any]], tokenizer: TokenizerRuntime) -> list[dict[str, Any]]:
    """The pipeline's `group_entities`: adjacent tokens of one entity type (a B- starts a new one)."""
    groups: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if groups and bi != "B" and _tag(groups[-1][-1]["entity"])[1] == tag:
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        {
            "entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in group])),
            "word": tokenizer.decode_tokens([e["word"] for e in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }
        for group in groups
    ]


def aggregate(
    text: str,
    enc: Encoded,
    probs: np.ndarray,
    strategy: str,
    labels: list[str],
    tokenizer: TokenizerRuntime,
    ignored: tuple[str, ...] = IGNORED_LABELS,
) -> list[dict[str, Any]]:
    tokens = _tokens(text, enc, probs, tokenizer)
    if strategy == "simple":
        entities = []
        for t in tokens:
            idx = int(t.scores.argmax())
            entities.append(_entity(labels[idx], float(t.scores[idx]), t.word, t.start, t.end))
    else:
        words: list[list[_Token]] = []
        for t in tokens:
            if words and t.is_subword:
                words[-1].append(t)
            else:
                words.append([t])
        entities = [_aggregate_word(w, strategy, labels, tokenizer) for w in words]
    return [g for g in _group(entities, tokenizer) if g["entity_group"] not in ignored]


def pipeline_tokens(
    text: str, enc: Encoded, probs: np.ndarray, labels: list[str], tokenizer: TokenizerRuntime, ignored: tuple[str, ...]
) -> list[dict[str, Any]]:
    """`aggregation_strategy: none` as transformers' pipeline (and the HF Inference API) answers it: each token's best label."""
    positions = [idx for idx in range(len(enc.ids)) if not enc.special[idx]]
    out = []
    for idx, token in zip(positions, _tokens(text, enc, probs, tokenizer), strict=True):
        best = int(token.scores.argmax())
        if labels[best] not in ignored:
            out.append(
                {
                    "entity": labels[best],
                    "score": float(token.scores[best]),
                    "index": idx,
                    "word": token.word,
                    "start": token.start,
                    "end": token.end,
                }
            )
    return out


def per_token(enc: Encoded, scores: np.ndarray, labels: list[str], tokenizer: TokenizerRuntime) -> list[dict[str, Any]]:
    return [
        {
            "token": tokenizer.id_to_token(token_id),
            "token_id": token_id,
            "start": enc.offsets[idx][0],
            "end": enc.offsets[idx][1],
            "results": {label: float(score) for label, score in zip(labels, scores[idx], strict=False)},
        }
        for idx, token_id in enumerate(enc.ids)
        if not enc.special[idx]
    ]


async def predict_tokens(service: InferenceService, request: PredictTokensRequest, timing: Timing) -> Any:
    items, single = predict_items(request.inputs)
    texts: list[str] = []
    for position, item in enumerate(items):
        if not isinstance(item, str):
            raise ValidationError(f"inputs.{position}: token classification takes single texts, not pairs")
        texts.append(item)
    check_count(len(texts), service)
    outcome = await service.run(texts, truncate=bool(request.truncate), direction=request.truncation_direction)
    timing.record(outcome)
    labels = service.engine.manifest.labels
    tokenizer = service.tokenizer
    answers = []
    ignored = IGNORED_LABELS if request.ignore_labels is None else tuple(request.ignore_labels)
    for text, enc, logits in zip(texts, outcome.encoded, outcome.rows, strict=True):
        if request.aggregation_strategy != "none":
            answers.append(aggregate(text, enc, activate(logits, raw=False), request.aggregation_strategy, labels, tokenizer, ignored))
        elif request.parameters is not None:  # the HF Inference API's shape
            answers.append(pipeline_tokens(text, enc, activate(logits, raw=False), labels, tokenizer, ignored))
        else:
            answers.append(per_token(enc, activate(logits, request.raw_scores), labels, tokenizer))
    return answers[0] if single else answers
