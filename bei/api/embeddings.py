"""/v1/embeddings (OpenAI) and /embed (TEI): dense embedding engines."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from bei.api.http import Timing
from bei.api.schemas import EmbeddingInput, EmbedRequest, OpenAIEmbeddingsRequest
from bei.api.scoring import check_count
from bei.errors import ValidationError
from bei.inference import InferenceService
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
    return items


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
    if dimensions is not None:
        if dimensions > full_dim:
            raise ValidationError(f"dimensions: {dimensions} is over the model's embedding size of {full_dim}")
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


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
    return np.stack(outcome.rows).astype(np.float32, copy=False)


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


async def tei_embed(service: InferenceService, request: EmbedRequest, timing: Timing) -> Any:
    items = as_inputs(request.inputs, service)
    vectors = await embed(
        service,
        items,
        truncate=bool(request.truncate),
        direction=request.truncation_direction,
        prompt=prompt_text(service, request.prompt_name),
        timing=timing,
    )
    return finish(vectors, normalize=request.normalize, dimensions=request.dimensions, full_dim=vectors.shape[1]).tolist()
