"""Sequence-classification engines: /rerank (BEI), /v1/rerank (Cohere-style) and /predict."""

from __future__ import annotations

from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.schemas import CohereRerankRequest, PredictInput, PredictRequest, RerankRequest
from bei.errors import EmptyInputError, TooManyInputsError, ValidationError
from bei.inference import InferenceService
from bei.text.tokenizer import Direction, TextInput


def activate(logits: np.ndarray, raw: bool) -> np.ndarray:
    """Logits [n, labels] -> scores: sigmoid for one label, softmax for several; logits if `raw`."""
    logits = logits.astype(np.float64)
    if raw:
        return logits
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def check_count(count: int, service: InferenceService) -> None:
    if count == 0:
        raise EmptyInputError("input is empty: send at least one text")
    limit = service.settings.max_client_batch_size
    if count > limit:
        raise TooManyInputsError(f"batch size {count} is over the maximum allowed batch size of {limit}")


async def logits_of(
    service: InferenceService, items: list[TextInput], *, truncate: bool, direction: Direction, timing: Timing
) -> np.ndarray:
    check_count(len(items), service)
    outcome = await service.run(items, truncate=truncate, direction=direction)
    timing.record(outcome)
    return np.stack(outcome.rows)


async def rerank(service: InferenceService, request: RerankRequest, timing: Timing) -> Any:
    pairs: list[TextInput] = [(request.query, text) for text in request.texts]
    logits = await logits_of(
        service,
        pairs,
        truncate=bool(request.truncate),
        direction=request.truncation_direction,
        timing=timing,
    )
    scores = activate(logits, request.raw_scores)[:, 0]
    results: list[dict[str, Any]] = []
    for index, score in enumerate(scores):
        item: dict[str, Any] = {"index": index, "score": float(score)}
        if request.return_text:
            item["text"] = request.texts[index]
        results.append(item)
    return results  # in the order of the input texts, as BEI documents


async def cohere_rerank(service: InferenceService, request: CohereRerankRequest, timing: Timing) -> Any:
    texts = [d if isinstance(d, str) else d.text for d in request.documents]
    pairs: list[TextInput] = [(request.query, text) for text in texts]
    # documents longer than the model's limit are truncated, as Cohere, Jina and Infinity do
    logits = await logits_of(service, pairs, truncate=True, direction="right", timing=timing)
    scores = activate(logits, raw=False)[:, 0]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: request.top_n]
    results: list[dict[str, Any]] = []
    for index in order:
        item: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if request.return_documents:
            item["document"] = {"text": texts[index]}
        results.append(item)
    return {
        "object": "list",
        "model": request.model or service.settings.served_model_name or service.engine.manifest.name,
        "results": results,
        "usage": {"prompt_tokens": timing.compute_tokens, "total_tokens": timing.compute_tokens},
    }


def predict_items(inputs: PredictInput) -> tuple[list[TextInput], bool]:
    """str | [str] | [[str]] -> items (a text or a pair) and whether the request was a single input."""
    if isinstance(inputs, str):
        return [inputs], True
    items: list[TextInput] = []
    for position, entry in enumerate(inputs):
        if isinstance(entry, str):
            items.append(entry)
        elif len(entry) == 1:
            items.append(entry[0])
        elif len(entry) == 2:
            items.append((entry[0], entry[1]))
        else:
            raise ValidationError(f"inputs.{position}: a list of {len(entry)} strings; use one string (a text) or two (a pair)")
    return items, False


async def predict(service: InferenceService, request: PredictRequest, timing: Timing) -> Any:
    items, single = predict_items(request.inputs)
    logits = await logits_of(
        service,
        items,
        truncate=bool(request.truncate),
        direction=request.truncation_direction,
        timing=timing,
    )
    labels = service.engine.manifest.labels
    answers = []
    for row in activate(logits, request.raw_scores):
        ranked = sorted(zip(labels, row, strict=False), key=lambda pair: -pair[1])
        answers.append([{"label": label, "score": float(score)} for label, score in ranked])
    return answers[0] if single else answers
