"""GET /info (TEI's shape, of the model `POST /` serves), /info/models (every served model),
/v1/models and /v1/models/{id} (OpenAI), /models (Infinity)."""

from __future__ import annotations

from typing import Any

from bei import __version__
from bei.api.routes import routes_for
from bei.api.state import AppState, ServedModel
from bei.kinds import Task

# TEI's `model_type` key of each task (TEI has no token classifier: a NER head is a classifier of tokens)
TEI_MODEL_TYPE = {
    Task.EMBED: "embedding",
    Task.SPARSE: "embedding",
    Task.EMBED_M3: "embedding",
    Task.RERANK: "reranker",
    Task.CLASSIFY: "classifier",
    Task.NER: "classifier",
}
# the capabilities Infinity's /models reports
CAPABILITIES = {
    Task.EMBED: ["embed"],
    Task.SPARSE: ["embed"],
    Task.EMBED_M3: ["embed"],
    Task.RERANK: ["rerank"],
    Task.CLASSIFY: ["classify"],
    Task.NER: ["classify"],
}


def model_type(model: ServedModel) -> dict[str, Any]:
    m = model.manifest
    if model.task in (Task.EMBED, Task.SPARSE, Task.EMBED_M3):
        pooling = "splade" if model.task == Task.SPARSE else "+".join(m.pooling.modes) if m.pooling else None
        return {"embedding": {"pooling": pooling}}
    id2label = {str(i): label for i, label in enumerate(m.labels)}
    return {TEI_MODEL_TYPE[model.task]: {"id2label": id2label, "label2id": {label: i for i, label in enumerate(m.labels)}}}


def info(state: AppState, model: ServedModel) -> dict[str, Any]:
    m = model.manifest
    service = model.service
    return {
        "model_id": model.name,
        "model_sha": m.source.revision,
        "model_dtype": m.precision.value,
        "model_type": model_type(model),
        "task": m.task.value,
        "pooling": m.pooling.modes if m.pooling else None,
        "labels": m.labels or None,
        "prompts": m.prompts or None,
        "architecture": m.architecture,
        "backend": m.target.name,
        "target": {"name": m.target.name, "gpu": m.target.gpu, "device": m.target.device},
        "embedding_dim": m.embedding_dim,
        "normalize": m.normalize,
        "max_input_length": m.max_input_tokens,
        "max_batch_tokens": service.max_batch_tokens if service else state.settings.max_batch_tokens or m.max_num_tokens,
        "max_batch_requests": service.max_batch_requests if service else state.settings.max_batch_requests or m.max_batch_size,
        "max_client_batch_size": state.settings.max_client_batch_size,
        "max_concurrent_requests": state.settings.max_concurrent_requests,
        "auto_truncate": state.settings.auto_truncate,
        "tokenization_workers": state.settings.tokenization_workers,
        "routes": routes_for(model.task),
        "version": __version__,
    }


def every_model(state: AppState) -> dict[str, Any]:
    return {"models": [info(state, m) for m in state.models.values()], "version": __version__}


# the `owned_by` of every model object: OpenAI's clients read it as free text, Infinity's client
# (`infinity_client.models.ModelInfo`) refuses any value but "infinity", so one shape serves both at
# /v1/models, /v1/models/{id} and /models
OWNED_BY = "infinity"


def model_card(model: ServedModel) -> dict[str, Any]:
    """OpenAI's model object, with Infinity's fields (`stats`, `backend`, `capabilities`)."""
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": OWNED_BY,
        "task": model.task.value,
        "backend": model.manifest.target.name,
        "capabilities": CAPABILITIES[model.task],
        "stats": {},
    }


def model_list(state: AppState) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m) for m in state.models.values()]}
