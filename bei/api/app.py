"""The starlette application: task routes from the route table, plus health, info, metrics, schema."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from bei import __version__
from bei.api import schemas
from bei.api.guard import ApiKeyMiddleware, http_error, server_error
from bei.api.http import OPENAI_STYLE_PREFIX, JSONResponse, Timing, error_response, json_response, read_json_within, validate
from bei.api.metrics import exposition
from bei.api.routes import DEFAULT_ROUTE, TASK_ROUTES, TaskRoute, routes_for
from bei.api.search import SearchRequest, search
from bei.api.state import AppState, ServedModel
from bei.errors import BeiError, NotReadyError, OverloadedError, RequestTimeoutError
from bei.inference import InferenceService
from bei.settings import ServeSettings
from bei.targets.loading import load_engine

log = logging.getLogger("bei")

CLIENT_CLOSED = 499  # nginx's code for a request whose client went away; nobody reads it


class ClientDisconnected(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable[Any], abandon: asyncio.Event) -> Any:
    """Run `work`; if the client disconnects first, cancel it (its inputs leave the queue); if the
    server stops waiting for it (`abandon`: SIGTERM's drain timed out), cancel it and answer 503."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    stopper = asyncio.ensure_future(abandon.wait())
    try:
        done, _ = await asyncio.wait({task, watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        stopper.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if stopper in done:
        raise NotReadyError("the server is shutting down and stopped waiting for this request")
    raise ClientDisconnected


async def _unless_abandoned(work: Awaitable[Any], abandon: asyncio.Event) -> Any:
    """`work`, or 503 once SIGTERM's drain stops waiting (a body still arriving then)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(abandon.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise NotReadyError("the server is shutting down and stopped waiting for this request")


RouteWork = Callable[[AppState, Request, Any, Timing], Awaitable[tuple[Any, dict[str, str]]]]


def _endpoint(state: AppState, path: str, work: RouteWork) -> Callable[[Request], Awaitable[Response]]:
    """The one request path of every POST route: body (within --body-timeout), limits, JSON, the
    work, errors, headers, metrics. A request counts against --max-concurrent-requests once its body
    is read: a slow upload holds no slot."""

    async def endpoint(request: Request) -> Response:
        timing = Timing()
        counted = False
        try:
            if state.draining:
                raise NotReadyError("the server is shutting down")
            state.receiving += 1
            try:
                body = read_json_within(request, state.settings.payload_limit, state.settings.body_timeout)
                data = await _unless_abandoned(body, state.abandon)
            finally:
                state.receiving -= 1
            state.in_flight += 1
            counted = True
            if state.in_flight > state.settings.max_concurrent_requests:
                raise OverloadedError(f"model is overloaded: more than {state.settings.max_concurrent_requests} concurrent requests")
            payload, headers = await _until_disconnect(request, work(state, request, data, timing), state.abandon)
            response = json_response(payload, timing)
            response.headers.update(headers)
        except (ClientDisconnected, ClientDisconnect):
            log.info("%s %s: the client went away before its answer", request.method, path)
            response = Response(status_code=CLIENT_CLOSED)
        except BeiError as error:
            response = error_response(error, path)
            response.headers.update(timing.headers())
            if isinstance(error, RequestTimeoutError):  # the rest of the body is never read
                response.headers["connection"] = "close"
        finally:
            if counted:
                state.in_flight -= 1
        if state.draining:  # the server is going away: clients should not reuse this connection
            response.headers["connection"] = "close"
        state.metrics.observe(path, response.status_code, timing.compute_tokens, timing.queue_time, timing.inference_time, timing.elapsed)
        return response

    return endpoint


def _task_work(route: TaskRoute) -> RouteWork:
    async def work(state: AppState, request: Request, data: Any, timing: Timing) -> tuple[Any, dict[str, str]]:
        requested = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None
        model = state.pick(route, requested, request.path_params.get("model_name"))
        service = state.ready(model)
        return await route.handler(service, validate(route.request, data), timing), {}

    return work


_SEARCH_ROUTES = {r.path: r for r in TASK_ROUTES}


async def _search_work(state: AppState, request: Request, data: Any, timing: Timing) -> tuple[Any, dict[str, str]]:
    body = validate(SearchRequest, data)
    embedder = state.ready(state.pick(_SEARCH_ROUTES["/v1/embeddings"], body.embed_model))
    reranker = state.ready(state.pick(_SEARCH_ROUTES["/rerank"], body.rerank_model)) if body.rerank else None
    return await search(embedder, reranker, body, timing)


def _info(state: AppState, model: ServedModel) -> dict[str, Any]:
    m = model.manifest
    service = model.service
    return {
        "model_id": model.name,
        "model_sha": m.source.revision,
        "model_dtype": m.precision.value,
        "model_type": {m.task.value: {"pooling": m.pooling.modes if m.pooling else None, "labels": m.labels or None}},
        "task": m.task.value,
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


# the 200 body of each route, for /openapi.json (bei/api/schemas.py; the prose is docs/api.md)
_RESPONSES: dict[str, type[BaseModel]] = {
    "/v1/embeddings": schemas.OpenAIEmbeddingsResponse,
    "/embed": schemas.EmbedResponse,
    "/rerank": schemas.RerankResponse,
    "/v1/rerank": schemas.CohereRerankResponse,
    "/predict": schemas.PredictResponse,
    "/predict_tokens": schemas.PredictTokensResponse,
    "/embed_sparse": schemas.SparseResponse,
    "/tokenize": schemas.TokenizeResponse,
    "/v1/search": schemas.SearchResponse,
    "/health": schemas.HealthResponse,
    "/info": schemas.InfoResponse,
    "/v1/models": schemas.ModelsResponse,
}
_ERRORS = {
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
_TIMING_HEADERS = {
    "x-compute-tokens": {"schema": {"type": "string"}, "description": "tokens the engine ran for this request"},
    "x-queue-time": _MS,
    "x-inference-time": _MS,
    "x-total-time": _MS,
}


def openapi_schema(state: AppState) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}

    def post(path: str, summary: str, request: type[BaseModel], headers: dict[str, Any]) -> dict[str, Any]:
        error = ref(schemas.OpenAIErrorBody if path.startswith(OPENAI_STYLE_PREFIX) else schemas.ErrorBody)
        responses: dict[str, Any] = {"200": {"description": "OK", "headers": headers, "content": ref(_RESPONSES[path])}}
        for status, description in _ERRORS.items():
            responses[status] = {"description": description, "headers": _TIMING_HEADERS, "content": error}
            if status in ("429", "503"):
                responses[status]["headers"] = {**_TIMING_HEADERS, "Retry-After": {"schema": {"type": "string"}}}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": ref(request)}, "responses": responses}}

    for route in TASK_ROUTES:
        paths[route.path] = post(route.path, route.summary, route.request, _TIMING_HEADERS)
    search_headers = {**_TIMING_HEADERS, "x-embed-time": _MS, "x-rerank-time": _MS}
    paths["/v1/search"] = post("/v1/search", "embed, keep the top_k by cosine, rerank: one round trip", SearchRequest, search_headers)
    for path, summary in (("/health", "200 once loaded and warmed"), ("/info", "what is served"), ("/v1/models", "OpenAI model list")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": ref(_RESPONSES[path])}}}}
    paths["/health"]["get"]["responses"]["503"] = {
        "description": "loading, failed to load, or shutting down",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
        "content": ref(schemas.ErrorBody),
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


def create_app(state: AppState) -> Starlette:
    first = next(iter(state.models.values()))

    async def health(_: Request) -> Response:
        if state.all_ready:
            return JSONResponse({"status": "ok"})
        failed = [m.load_error for m in state.models.values() if m.load_error]
        reason = "the server is shutting down" if state.draining else (failed[0] if failed else "the model is loading")
        response = error_response(NotReadyError(reason), "/health")
        if state.draining:
            response.headers["connection"] = "close"
        return response

    async def info(_: Request) -> Response:
        if len(state.models) == 1:
            return JSONResponse(_info(state, first))
        return JSONResponse({"models": [_info(state, m) for m in state.models.values()], "version": __version__})

    async def models(_: Request) -> Response:
        data = [{"id": m.name, "object": "model", "owned_by": "bei", "created": 0, "task": m.task.value} for m in state.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(_: Request) -> Response:
        body, content_type = exposition(state.registry)
        return Response(body, headers={"content-type": content_type})

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_schema(state))

    async def docs(_: Request) -> Response:
        items = "".join(f"<li><code>POST {r.path}</code>: {r.summary}</li>" for r in TASK_ROUTES)
        served = ", ".join(state.models)
        return HTMLResponse(
            f"<html><body><h1>bei {__version__}</h1><p>{served}</p><ul>{items}</ul>"
            '<p>Schema: <a href="/openapi.json">/openapi.json</a></p></body></html>'
        )

    routes = [Route(r.path, _endpoint(state, r.path, _task_work(r)), methods=["POST"]) for r in TASK_ROUTES]
    routes.append(Route("/v1/search", _endpoint(state, "/v1/search", _search_work), methods=["POST"]))
    default_path = first.manifest.default_route or DEFAULT_ROUTE[first.task]
    default = next((r for r in TASK_ROUTES if r.path == default_path), None)
    if default is not None:
        routes.append(Route("/", _endpoint(state, "/", _task_work(default)), methods=["POST"]))
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    # /<model>/<route>: after the exact routes, so /v1/rerank is never read as model "v1"
    routes += [Route("/{model_name}" + r.path, _endpoint(state, r.path, _task_work(r)), methods=["POST"]) for r in TASK_ROUTES]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(_load_all(state))
        try:
            yield
        finally:
            state.draining = True
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            for model in state.models.values():
                if model.service is not None:
                    await model.service.stop()

    middleware = [Middleware(ApiKeyMiddleware, settings=state.settings)] if state.settings.api_key is not None else []
    handlers = {404: http_error, 405: http_error, 500: server_error}
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers=handlers)


async def _load_all(state: AppState) -> None:
    for model in state.models.values():  # one after the other: they share the device
        await _load(state, model)


async def _load(state: AppState, model: ServedModel) -> None:
    """Load and warm one engine in the background: /health answers 503 until every one is done. A
    failure is logged in full and stops the server (`state.on_load_failure`); clients only read that the
    engine failed to load, never the error's paths or runtime internals."""
    try:
        engine = await asyncio.to_thread(model.load)
        service = InferenceService(engine, state.settings)
        service.start()
        await service.warmup()
    except Exception as error:  # noqa: BLE001 - logged, and the server stops
        detail = error.message if isinstance(error, BeiError) else repr(error)
        model.load_error = f"the engine {model.name!r} failed to load; the server log says why"
        model.load_detail = f"the engine {model.name!r} failed to load: {detail}"
        if isinstance(error, BeiError):
            log.error(model.load_detail)
        else:
            log.exception(model.load_detail)
        if state.on_load_failure is not None:
            state.on_load_failure()
        return
    model.service = service
    log.info("engine %s ready: task %s, backend %s", model.name, model.task.value, model.manifest.target.name)


def state_for_engines(folders: list[Path], settings: ServeSettings) -> AppState:
    """Check every engine now (its manifest, this machine, its files' hashes: clear errors before the
    server starts); backends load later."""
    from bei.errors import ConfigError
    from bei.targets.loading import open_manifest

    models: dict[str, ServedModel] = {}
    for folder in folders:
        manifest = open_manifest(folder)
        name = settings.served_model_name if settings.served_model_name and len(folders) == 1 else manifest.name
        if name in models:
            raise ConfigError(f"two engines are named {name!r}; serve each name once")
        models[name] = ServedModel(
            name=name,
            manifest=manifest,
            load=functools.partial(load_engine, folder, threads=settings.engine_threads, manifest=manifest),
        )
    return AppState(settings=settings, models=models)


def app_for_engine(folder: Path, settings: ServeSettings) -> Starlette:
    """The app serving one engine directory."""
    return create_app(state_for_engines([folder], settings))
