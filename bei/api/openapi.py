"""GET /openapi.json: the request and response bodies, error bodies and headers of every route."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bei import __version__
from bei.api import schemas
from bei.api.http import ErrorStyle
from bei.api.routes import served_paths, variants
from bei.api.search import SearchRequest
from bei.api.state import AppState

# the 200 body of each route (bei/api/schemas.py; the prose is docs/api.md); a path several routes share lists each
RESPONSES: dict[str, tuple[type[BaseModel], ...]] = {
    "/v1/embeddings": (schemas.OpenAIEmbeddingsResponse,),
    "/embeddings": (schemas.OpenAIEmbeddingsResponse,),
    "/embed": (schemas.EmbedResponse,),
    "/similarity": (schemas.SimilarityResponse,),
    "/v1/embed": (schemas.CohereEmbedResponse,),
    "/v2/embed": (schemas.CohereEmbedResponse,),
    "/rerank": (schemas.RerankResponse, schemas.InfinityRerankResponse),
    "/v1/rerank": (schemas.CohereRerankResponse,),
    "/v2/rerank": (schemas.CohereRerankResponse,),
    "/predict": (schemas.PredictResponse,),
    "/classify": (schemas.InfinityClassifyResponse,),
    "/v1/classify": (schemas.InfinityClassifyResponse,),
    "/predict_tokens": (schemas.PredictTokensResponse,),
    "/embed_sparse": (schemas.SparseResponse,),
    "/embed_all": (schemas.EmbedAllResponse,),
    "/tokenize": (schemas.TokenizeResponse,),
    "/v1/search": (schemas.SearchResponse,),
}
GETS: dict[str, tuple[str, type[BaseModel]]] = {
    "/health": ("200 once loaded and warmed", schemas.HealthResponse),
    "/info": ("TEI's info of the model POST / serves", schemas.ModelInfo),
    "/info/models": ("every served model's info", schemas.ModelsInfo),
    "/v1/models": ("OpenAI model list", schemas.ModelsResponse),
    "/models": ("Infinity's model list", schemas.ModelsResponse),
}
ERROR_BODIES: dict[ErrorStyle, type[BaseModel]] = {
    "tei": schemas.ErrorBody,
    "openai": schemas.OpenAIErrorBody,
    "cohere": schemas.CohereErrorBody,
}
ERRORS = {
    "400": "empty input, or a route the chosen model cannot serve",
    "401": "--api-key is set and the request lacks `Authorization: Bearer <key>`",
    "404": "the named model is not served here",
    "408": "the request body did not arrive within --body-timeout",
    "413": "request body over --payload-limit",
    "422": "invalid JSON or fields, input too long, too many inputs",
    "424": "the engine failed on this request's batch",
    "429": "more than --max-concurrent-requests in flight",
    "503": "loading, failed to load, or shutting down",
}
_MS = {"schema": {"type": "string"}, "description": "milliseconds, 3 decimals"}
TIMING_HEADERS = {
    "x-compute-tokens": {"schema": {"type": "string"}, "description": "tokens the engine ran for this request"},
    "x-queue-time": _MS,
    "x-inference-time": _MS,
    "x-total-time": _MS,
}


def openapi_schema(state: AppState) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}

    def schema_of(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def content(*models: type[BaseModel]) -> dict[str, Any]:
        refs = [schema_of(m) for m in models]
        return {"application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}

    def post(
        summary: str, requests: list[type[BaseModel]], responses: tuple[type[BaseModel], ...], style: ErrorStyle, headers: dict[str, Any]
    ) -> dict[str, Any]:
        answers: dict[str, Any] = {"200": {"description": "OK", "headers": headers, "content": content(*responses)}}
        for status, description in ERRORS.items():
            answers[status] = {"description": description, "headers": TIMING_HEADERS, "content": content(ERROR_BODIES[style])}
            if status in ("429", "503"):
                answers[status]["headers"] = {**TIMING_HEADERS, "Retry-After": {"schema": {"type": "string"}}}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": content(*requests)}, "responses": answers}}

    for path in served_paths():
        routes = variants(path)
        summary = "; or ".join(r.summary for r in routes)
        paths[path] = post(summary, [r.request for r in routes], RESPONSES[path], routes[0].errors, TIMING_HEADERS)
    search_headers = {**TIMING_HEADERS, "x-embed-time": _MS, "x-rerank-time": _MS}
    paths["/v1/search"] = post(
        "embed, keep the top_k by cosine, rerank: one round trip", [SearchRequest], RESPONSES["/v1/search"], "openai", search_headers
    )
    for path, (summary, model) in GETS.items():
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": content(model)}}}}
    paths["/v1/models/{model_id}"] = {
        "get": {
            "summary": "one OpenAI model object",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "OK", "content": content(schemas.ModelResponse)},
                "404": {"description": "not served here", "content": content(schemas.OpenAIErrorBody)},
            },
        }
    }
    paths["/{model_name}/info"] = {
        "get": {
            "summary": "TEI's info of one served model",
            "parameters": [{"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "OK", "content": content(schemas.ModelInfo)},
                "404": {"description": "not served here", "content": content(schemas.ErrorBody)},
            },
        }
    }
    paths["/health"]["get"]["responses"]["503"] = {
        "description": "loading, failed to load, or shutting down",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
        "content": content(schemas.ErrorBody),
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "this schema",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bei",
            "version": __version__,
            "description": "serving " + ", ".join(f"{m.name} ({m.task.value})" for m in state.models.values()),
        },
        "paths": paths,
        "components": {"schemas": components},
    }
