"""/v1/embeddings (OpenAI, Infinity), /embed and /similarity (TEI): dense embedding engines."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.schemas import EmbeddingInput, EmbedRequest, OpenAIEmbeddingsRequest, SimilarityRequest
from bei.api.scoring import check_count
from bei.errors import ValidationError
from bei.inference import InferenceService
from bei.kinds import Task
from bei.text.tokenizer import Direction, TextInput


def as_inputs(raw: EmbeddingInput, service: InferenceService) -> list[TextInput]:
    """str | [str] | [int] | [[int]] -> one item per input (token id lists stay lists)."""
    if isinstance(raw, str):
        items: list[TextInput] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # type: ignore[arg-type]
    else:
        items = list(raw)  # type: ignore[arg-type]
    check_count(len(items), service)
    if service.settings.strict_token_ids:
        for position, item in enumerate(items):
            if isinstance(item, list):
                check_framed(item, position, service)
    return items


def check_framed(ids: list[int], position: int, service: InferenceService) -> None:
    """Token ids must be the model's own tokenization, special tokens included (as /tokenize returns them):
    ids of another tokenizer are valid ids of this vocabulary often enough to give wrong vectors silently."""
    head, tail = service.tokenizer.frame
    if ids[: len(head)] == head and (not tail or ids[-len(tail) :] == tail) and len(ids) >= len(head) + len(tail):
        return

    def names(ids: list[int]) -> str:
        return " ".join(f"{service.tokenizer.id_to_token(i)} ({i})" for i in ids)

    raise ValidationError(
        f"input.{position}: these token ids are not the model's tokenization: the model's tokenizer begins an input with "
        f"{names(head) or 'nothing'} and ends it with {names(tail) or 'nothing'}, these begin with {ids[: max(len(head), 1)]} and end "
        f"with {ids[-max(len(tail), 1) :]}. Ids of another tokenizer give wrong vectors (langchain's OpenAIEmbeddings sends "
        "tiktoken ids unless check_embedding_ctx_length=False): send the texts, or ids from POST /tokenize "
        "(a server started with --no-strict-token-ids takes any ids of the vocabulary)"
    )


def prompt_text(service: InferenceService, prompt_name: str | None) -> str | None:
    """The instruction prefix: the named prompt, else the model's default one, else none."""
    manifest = service.engine.manifest
    name = prompt_name or manifest.default_prompt_name
    if name is None:
        return None
    if name not in manifest.prompts:
        allowed = ", ".join(manifest.prompts) or "none defined"
        raise ValidationError(f"prompt_name: {name!r} is not one of the model's prompts ({allowed})")
    return manifest.prompts[name]


def finish(vectors: np.ndarray, *, normalize: bool, dimensions: int | None, full_dim: int) -> np.ndarray:
    """Matryoshka truncation to `dimensions`, then L2 normalization when asked."""
    if dimensions:  # 0 (Infinity's client default) and null: every dimension
        if dimensions > full_dim:
            raise ValidationError(f"dimensions: {dimensions} is over the model's embedding size of {full_dim}")
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


def dense_rows(service: InferenceService, rows: Sequence[np.ndarray]) -> np.ndarray:
    """[inputs, dim]: each input's dense embedding; of a bge-m3 engine (per-token rows, bei/api/m3.py),
    its CLS row's first `embedding_dim` columns, the last hidden state."""
    manifest = service.engine.manifest
    if manifest.task is not Task.EMBED_M3:
        return np.stack(rows)
    return np.stack([row[0, : manifest.embedding_dim] for row in rows])


async def embed(
    service: InferenceService,
    items: list[TextInput],
    *,
    truncate: bool,
    direction: Direction,
    prompt: str | None,
    timing: Timing,
) -> np.ndarray:
    outcome = await service.run(items, truncate=truncate, direction=direction, prompt=prompt)
    timing.record(outcome)
    return dense_rows(service, outcome.rows).astype(np.float32, copy=False)


async def openai_embeddings(service: InferenceService, request: OpenAIEmbeddingsRequest, timing: Timing) -> Any:
    manifest = service.engine.manifest
    items = as_inputs(request.input, service)
    vectors = await embed(service, items, truncate=False, direction="right", prompt=prompt_text(service, None), timing=timing)
    vectors = finish(vectors, normalize=manifest.normalize, dimensions=request.dimensions, full_dim=vectors.shape[1])
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        value: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") if request.encoding_format == "base64" else vector.tolist()
        )
        data.append({"object": "embedding", "embedding": value, "index": index})
    return {
        "object": "list",
        "data": data,
        "model": request.model or service.settings.served_model_name or manifest.name,
        "usage": {"prompt_tokens": timing.compute_tokens, "total_tokens": timing.compute_tokens},
    }


async def embed_as_asked(
    service: InferenceService, items: list[TextInput], request: EmbedRequest | SimilarityRequest, timing: Timing
) -> np.ndarray:
    """`embed` with the TEI-style request's truncate, truncation_direction and prompt_name."""
    return await embed(
        service,
        items,
        truncate=bool(request.truncate),
        direction=request.truncation_direction,
        prompt=prompt_text(service, request.prompt_name),
        timing=timing,
    )


async def tei_embed(service: InferenceService, request: EmbedRequest, timing: Timing) -> Any:
    items = as_inputs(request.inputs, service)
    vectors = await embed_as_asked(service, items, request, timing)
    return finish(vectors, normalize=request.normalize, dimensions=request.dimensions, full_dim=vectors.shape[1]).tolist()


async def similarity(service: InferenceService, request: SimilarityRequest, timing: Timing) -> Any:
    """The cosine of `source_sentence` with each of `sentences`, in their order (TEI, sentence-transformers)."""
    items: list[TextInput] = [request.inputs.source_sentence, *request.inputs.sentences]
    check_count(len(request.inputs.sentences), service)
    vectors = await embed_as_asked(service, items, request, timing)
    vectors = finish(vectors, normalize=True, dimensions=None, full_dim=vectors.shape[1])
    return [float(x) for x in vectors[1:] @ vectors[0]]
