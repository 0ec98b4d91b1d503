"""Cohere's embed routes: /v1/embed and /v2/embed (`cohere.Client` and `cohere.ClientV2`); their rerank is
/v1/rerank and /v2/rerank (bei/api/scoring.py). Errors on these routes are Cohere's `{"message": ...}`.

`input_type` picks the model's prompt of that name (below), `truncate` is NONE / START / END (default END),
`embedding_types` are computed from the L2-normalized vector as sentence-transformers' `quantize_embeddings`
does, with the fixed range [-1, 1] in every dimension for int8 / uint8 (so a vector's codes do not depend on
the other texts of its request).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from bei.api.embeddings import as_inputs, embed, finish, prompt_text
from bei.api.http import Timing
from bei.api.schemas import _Request
from bei.errors import ValidationError
from bei.inference import InferenceService

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
InputType = Literal["search_document", "search_query", "classification", "clustering"]

# the checkpoint prompt each input_type takes, the first of these names the model defines
PROMPTS_OF_INPUT_TYPE: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


class Content(BaseModel):
    type: str
    text: str | None = None


class Input(BaseModel):
    """v2's `inputs` entry: `{"content": [{"type": "text", "text": ...}]}`: one text component (bei serves text models)."""

    content: list[Content] = Field(min_length=1, max_length=1)

    @field_validator("content")
    @classmethod
    def _one_text(cls, value: list[Content]) -> list[Content]:
        if value[0].type != "text" or value[0].text is None:
            raise ValueError(f"a content component of type {value[0].type!r}: bei embeds text ({{'type': 'text', 'text': ...}})")
        return value


class EmbedRequest(_Request):
    """Cohere's embed request (v1 and v2): `texts`, or v2's `inputs`."""

    texts: list[str] | None = None
    inputs: list[Input] | None = None
    input_type: InputType | None = None
    embedding_types: list[EmbeddingType] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _texts_or_inputs(self) -> EmbedRequest:
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("send `texts` or `inputs` (one of them)")
        return self

    @property
    def all_texts(self) -> list[str]:
        if self.texts is not None:
            return self.texts
        return [str(entry.content[0].text) for entry in self.inputs or []]

    @field_validator("truncate", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def prompt_for(service: InferenceService, input_type: str | None) -> str | None:
    prompts = service.engine.manifest.prompts
    for name in PROMPTS_OF_INPUT_TYPE.get(input_type or "", ()):
        if name in prompts:
            return prompts[name]
    return prompt_text(service, None)


def quantize(vectors: np.ndarray, kind: str) -> Any:
    """sentence-transformers' `quantize_embeddings(vectors, kind, ranges=[[-1]*d, [1]*d])` of unit vectors."""
    vectors = vectors.astype(np.float32, copy=False)
    if kind == "float":
        return vectors
    if kind == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    if kind in ("int8", "uint8"):
        starts = np.full(vectors.shape[1], -1.0, dtype=np.float32)
        steps = (np.full(vectors.shape[1], 1.0, dtype=np.float32) - starts) / 255
        codes = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return (codes - 128).astype(np.int8) if kind == "int8" else codes.astype(np.uint8)
    packed = np.packbits(vectors > 0, axis=-1)
    return (packed - 128).astype(np.int8) if kind == "binary" else packed


async def _vectors(service: InferenceService, request: EmbedRequest, timing: Timing) -> np.ndarray:
    limit = service.tokenizer.max_length
    if request.max_tokens is not None and request.max_tokens < limit:
        raise ValidationError(
            f"max_tokens: {request.max_tokens} is under the model's limit of {limit} tokens, where bei truncates; leave it out"
        )
    items = as_inputs(request.all_texts, service)
    vectors = await embed(
        service,
        items,
        truncate=request.truncate != "NONE",
        direction="left" if request.truncate == "START" else "right",
        prompt=prompt_for(service, request.input_type),
        timing=timing,
    )
    return finish(vectors, normalize=True, dimensions=request.output_dimension, full_dim=vectors.shape[1])


def _answer(request: EmbedRequest, embeddings: Any, response_type: str, version: str, timing: Timing) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "response_type": response_type,
        "embeddings": embeddings,
        "texts": request.all_texts,
        "meta": {"api_version": {"version": version}, "billed_units": {"input_tokens": timing.compute_tokens}},
    }


async def embed_v1(service: InferenceService, request: EmbedRequest, timing: Timing) -> Any:
    vectors = await _vectors(service, request, timing)
    if request.embedding_types is None:
        return _answer(request, vectors, "embeddings_floats", "1", timing)
    by_type = {kind: quantize(vectors, kind) for kind in dict.fromkeys(request.embedding_types)}
    return _answer(request, by_type, "embeddings_by_type", "1", timing)


async def embed_v2(service: InferenceService, request: EmbedRequest, timing: Timing) -> Any:
    vectors = await _vectors(service, request, timing)
    by_type = {kind: quantize(vectors, kind) for kind in dict.fromkeys(request.embedding_types or ["float"])}
    return _answer(request, by_type, "embeddings_by_type", "2", timing)
