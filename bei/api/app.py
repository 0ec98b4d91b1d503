"""The starlette application: task routes from the route table, plus health, info, metrics, schema."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError as PydanticValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from bei import __version__
from bei.api import info
from bei.api.guard import ApiKeyMiddleware, http_error, server_error
from bei.api.http import (
    ErrorStyle,
    JSONResponse,
    Timing,
    close_connection,
    describe_validation_error,
    error_response,
    json_response,
    read_json_within,
    validate,
)
from bei.api.metrics import exposition
from bei.api.openapi import openapi_schema
from bei.api.routes import DEFAULT_ROUTE, TaskRoute, root_variants, served_paths, variants
from bei.api.search import SearchRequest, check_corpus, search
from bei.api.state import AppState, ServedModel
from bei.errors import BeiError, InputTooLongError, ModelNotFoundError, NotReadyError, OverloadedError, RequestTimeoutError, ValidationError
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


def _endpoint(state: AppState, path: str, work: RouteWork, errors: ErrorStyle) -> Callable[[Request], Awaitable[Response]]:
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
            response = error_response(error, errors)
            response.headers.update(timing.headers())
            if isinstance(error, RequestTimeoutError):  # the rest of the body is never read
                close_connection(response, request)
        finally:
            if counted:
                state.in_flight -= 1
        if state.draining:  # the server is going away: clients should not reuse this connection
            close_connection(response, request)
        state.metrics.observe(path, response.status_code, timing.compute_tokens, timing.queue_time, timing.inference_time, timing.elapsed)
        return response

    return endpoint


def with_parameters(data: Any) -> Any:
    """huggingface_hub's InferenceClient sends `{"inputs": ..., "parameters": {...}}`: the options in
    `parameters` are read as top-level fields (a top-level field wins); `parameters` stays, so that a
    route can answer in the HF Inference API's shape."""
    if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
        return {**data["parameters"], **data}
    return data


def choose(routes: list[TaskRoute], data: Any) -> tuple[TaskRoute, Any]:
    """The first route whose request model validates the body; else the 422 of the route the body comes
    closest to (fewest missing fields; the first of those): `{"documents": ..., "top_n": 0}` on /rerank
    hears about `top_n`, not about TEI's `texts`."""
    closest: tuple[int, PydanticValidationError] | None = None
    for route in routes:
        try:
            return route, route.request.model_validate(data)
        except PydanticValidationError as error:
            missing = sum(e["type"] == "missing" for e in error.errors())
            if closest is None or missing < closest[0]:
                closest = (missing, error)
    assert closest is not None
    raise ValidationError(describe_validation_error(closest[1]))


def _task_work(path: str, routes: list[TaskRoute]) -> RouteWork:
    async def work(state: AppState, request: Request, data: Any, timing: Timing) -> tuple[Any, dict[str, str]]:
        data = with_parameters(data)
        route, body = choose(routes, data)
        requested = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None
        service = state.ready(state.pick(route, requested, request.path_params.get("model_name"), path))
        try:
            return await route.handler(service, body, timing), {}
        except InputTooLongError as error:  # the tokenizer says how long; the route says what the client can do
            raise InputTooLongError(f"{error.message}; {route.too_long}") from None

    return work


async def _search_work(state: AppState, request: Request, data: Any, timing: Timing) -> tuple[Any, dict[str, str]]:
    body = validate(SearchRequest, data)
    embedder = state.ready(state.pick(variants("/v1/embeddings")[0], body.embed_model))
    check_corpus(body, embedder.engine.manifest.embedding_dim or 0)
    reranker = state.ready(state.pick(variants("/rerank")[0], body.rerank_model)) if body.rerank else None
    return await search(embedder, reranker, body, timing)


def create_app(state: AppState) -> Starlette:
    first = next(iter(state.models.values()))

    async def health(request: Request) -> Response:
        if state.all_ready:
            return JSONResponse({"status": "ok"})
        failed = [m.load_error for m in state.models.values() if m.load_error]
        reason = "the server is shutting down" if state.draining else (failed[0] if failed else "the model is loading")
        response = error_response(NotReadyError(reason), "tei")
        if state.draining:
            close_connection(response, request)
        return response

    async def model(request: Request) -> Response:
        name = request.path_params["model_id"]
        if name not in state.models:
            error = ModelNotFoundError(f"model {name!r} is not served here; served: {', '.join(state.models)}")
            return error_response(error, "openai")
        return JSONResponse(info.model_card(state.models[name]))

    async def model_info(request: Request) -> Response:
        name = request.path_params["model_name"]
        if name not in state.models:
            return error_response(ModelNotFoundError(f"model {name!r} is not served here; served: {', '.join(state.models)}"), "tei")
        return JSONResponse(info.info(state, state.models[name]))

    async def metrics(_: Request) -> Response:
        body, content_type = exposition(state.registry)
        return Response(body, headers={"content-type": content_type})

    async def docs(_: Request) -> Response:
        items = "".join(f"<li><code>POST {path}</code>: {variants(path)[0].summary}</li>" for path in served_paths())
        served = ", ".join(state.models)
        return HTMLResponse(
            f"<html><body><h1>bei {__version__}</h1><p>{served}</p><ul>{items}</ul>"
            '<p>Schema: <a href="/openapi.json">/openapi.json</a></p></body></html>'
        )

    def get(body: Callable[[], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(_: Request) -> Response:
            return JSONResponse(body())

        return endpoint

    def post(path: str, routes: list[TaskRoute], errors: ErrorStyle, prefix: str = "") -> Route:
        return Route(prefix + path, _endpoint(state, path, _task_work(path, routes), errors), methods=["POST"])

    routes = [post(path, variants(path), variants(path)[0].errors) for path in served_paths()]
    routes.append(Route("/v1/search", _endpoint(state, "/v1/search", _search_work, "openai"), methods=["POST"]))
    root = root_variants(first.task, first.manifest.default_route or DEFAULT_ROUTE[first.task])
    if root:
        routes.append(post("/", root, "tei"))
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/info", get(lambda: info.info(state, first)), methods=["GET"]),
        Route("/info/models", get(lambda: info.every_model(state)), methods=["GET"]),
        Route("/v1/models", get(lambda: info.model_list(state)), methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/models", get(lambda: info.model_list(state)), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", get(lambda: openapi_schema(state)), methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    # /<model>/<route>: after the exact routes, so /v1/rerank is never read as model "v1"
    routes.append(Route("/{model_name}/info", model_info, methods=["GET"]))
    routes += [post(path, variants(path), variants(path)[0].errors, prefix="/{model_name}") for path in served_paths()]

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
