"""Sequence-classification engines: /rerank (BEI), /v1/rerank and /v2/rerank (Cohere-style) and /predict."""

from __future__ import annotations

import uuid
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


async def ranked(
    service: InferenceService, query: str, texts: list[str], *, raw: bool, top_n: int | None, timing: Timing
) -> list[tuple[int, float]]:
    """(index, score) of the best `top_n` texts for `query`, best first: Cohere's and Infinity's rerank.
    Pairs over the model's limit are truncated (right), as Cohere, Jina and Infinity do."""
    pairs: list[TextInput] = [(query, text) for text in texts]
    logits = await logits_of(service, pairs, truncate=True, direction="right", timing=timing)
    scores = activate(logits, raw)[:, 0]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]
    return [(i, float(scores[i])) for i in order]


def served_name(service: InferenceService, requested: str | None) -> str:
    return requested or service.settings.served_model_name or service.engine.manifest.name


async def cohere_rerank(service: InferenceService, request: CohereRerankRequest, timing: Timing) -> Any:
    texts = [d if isinstance(d, str) else d.text for d in request.documents]
    results: list[dict[str, Any]] = []
    for index, score in await ranked(service, request.query, texts, raw=False, top_n=request.top_n, timing=timing):
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if request.return_documents:
            item["document"] = {"text": texts[index]}
        results.append(item)
    return {
        "id": uuid.uuid4().hex,
        "object": "rerank",
        "model": served_name(service, request.model),
        "results": results,
        "usage": {"prompt_tokens": timing.compute_tokens, "total_tokens": timing.compute_tokens},
        "meta": {"billed_units": {"search_units": 1, "input_tokens": timing.compute_tokens}},
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


async def label_scores(
    service: InferenceService,
    items: list[TextInput],
    *,
    function: str | None,
    top_k: int | None,
    truncate: bool,
    direction: Direction,
    timing: Timing,
) -> list[list[dict[str, Any]]]:
    """Per input, `{label, score}` best first (the top_k): softmax (sigmoid for one label), else `function`."""
    logits = (await logits_of(service, items, truncate=truncate, direction=direction, timing=timing)).astype(np.float64)
    if function == "none":
        scores = logits
    elif function == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    elif function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
    else:
        scores = activate(logits, raw=False)
    labels = service.engine.manifest.labels
    answers = []
    for row in scores:
        best = sorted(zip(labels, row, strict=False), key=lambda pair: -pair[1])[:top_k]
        answers.append([{"label": label, "score": float(score)} for label, score in best])
    return answers


async def predict(service: InferenceService, request: PredictRequest, timing: Timing) -> Any:
    items, single = predict_items(request.inputs)
    answers = await label_scores(
        service,
        items,
        function="none" if request.raw_scores else request.function_to_apply,
        top_k=request.top_k,
        truncate=bool(request.truncate),
        direction=request.truncation_direction,
        timing=timing,
    )
    # a single text answers one list (TEI); in the HF Inference API's shape (a body with `parameters`), a list of one
    return answers[0] if single and request.parameters is None else answers
