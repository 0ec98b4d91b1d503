"""The starlette application: task routes from the route table, plus health, info, metrics, schema."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bei import __version__
from bei.api.http import Timing, error_response, json_response, parse_body
from bei.api.metrics import Metrics
from bei.api.routes import DEFAULT_ROUTE, TASK_ROUTES, TaskRoute, routes_for
from bei.engine.manifest import Manifest
from bei.errors import BeiError, NotReadyError, OverloadedError, WrongRouteError
from bei.inference import InferenceService
from bei.modeling.spec import Task
from bei.runtime.engine import LoadedEngine, load_engine
from bei.settings import ServeSettings

log = logging.getLogger("bei")


@dataclass
class AppState:
    settings: ServeSettings
    manifest: Manifest
    load: Callable[[], LoadedEngine]
    service: InferenceService | None = None
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def task(self) -> Task:
        return Task(self.manifest.task)

    @property
    def model_id(self) -> str:
        return self.settings.served_model_name or self.manifest.name

    def ready_service(self) -> InferenceService:
        if self.draining:
            raise NotReadyError("the server is shutting down")
        if self.service is None:
            raise NotReadyError(self.load_error or "the model is loading")
        return self.service


def _task_endpoint(state: AppState, route: TaskRoute) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        timing = Timing()
        status = 200
        state.in_flight += 1
        try:
            if state.in_flight > state.settings.max_concurrent_requests:
                raise OverloadedError(
                    f"model is overloaded: more than {state.settings.max_concurrent_requests} concurrent requests"
                )
            service = state.ready_service()
            if state.task not in route.tasks:
                raise WrongRouteError(
                    f"{route.path} cannot serve this {state.task.value} engine; its routes are: "
                    + ", ".join(routes_for(state.task))
                )
            body = await parse_body(request, route.request, state.settings.payload_limit)
            response = json_response(await route.handler(service, body, timing), timing)
        except BeiError as error:
            response = error_response(error, route.path)
            response.headers.update(timing.headers())
            status = response.status_code
        finally:
            state.in_flight -= 1
        state.metrics.observe(route.path, status, timing.compute_tokens, timing.queue_time, timing.inference_time)
        return response

    return endpoint


def _info(state: AppState) -> dict[str, Any]:
    m = state.manifest
    service = state.service
    return {
        "model_id": state.model_id,
        "model_sha": m.source.revision,
        "model_dtype": m.precision,
        "model_type": {m.task: {"pooling": m.pooling.modes if m.pooling else None, "labels": m.labels or None}},
        "task": m.task,
        "architecture": m.architecture,
        "backend": m.target.name,
        "embedding_dim": m.embedding_dim,
        "normalize": m.normalize,
        "max_input_length": m.max_input_tokens,
        "max_batch_tokens": service.max_batch_tokens if service else state.settings.max_batch_tokens or m.max_num_tokens,
        "max_batch_requests": service.max_batch_requests if service else state.settings.max_batch_requests or m.max_batch_size,
        "max_client_batch_size": state.settings.max_client_batch_size,
        "max_concurrent_requests": state.settings.max_concurrent_requests,
        "auto_truncate": state.settings.auto_truncate,
        "tokenization_workers": state.settings.tokenization_workers,
        "routes": routes_for(state.task),
        "version": __version__,
    }


def openapi_schema(state: AppState) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for route in TASK_ROUTES:
        schema = route.request.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[route.request.__name__] = schema
        paths[route.path] = {
            "post": {
                "summary": route.summary,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.request.__name__}"}}},
                },
                "responses": {"200": {"description": "OK"}, "400": {"description": "empty input or wrong route"},
                              "413": {"description": "payload too large"}, "422": {"description": "invalid input"},
                              "429": {"description": "overloaded"}, "503": {"description": "not ready"}},
            }
        }
    for path, summary in (("/health", "200 once loaded and warmed"), ("/info", "what is served"),
                          ("/v1/models", "OpenAI model list"), ("/metrics", "Prometheus metrics")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bei", "version": __version__, "description": f"serving {state.model_id} ({state.manifest.task})"},
        "paths": paths,
        "components": {"schemas": components},
    }


def create_app(state: AppState) -> Starlette:
    async def health(_: Request) -> Response:
        try:
            state.ready_service()
        except NotReadyError as error:
            return error_response(error, "/health")
        return JSONResponse({"status": "ok"})

    async def info(_: Request) -> Response:
        return JSONResponse(_info(state))

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": state.model_id, "object": "model", "owned_by": "bei", "created": 0}]})

    async def metrics(_: Request) -> Response:
        service = state.service
        text = state.metrics.render(
            batches=service.batcher.batches_run if service else 0,
            queue_depth=len(service.batcher.queue) if service else 0,
            in_flight=state.in_flight,
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_schema(state))

    async def docs(_: Request) -> Response:
        items = "".join(f"<li><code>POST {r.path}</code>: {r.summary}</li>" for r in TASK_ROUTES)
        return HTMLResponse(f"<html><body><h1>bei {__version__}</h1><p>{state.model_id}</p><ul>{items}</ul>"
                            '<p>Schema: <a href="/openapi.json">/openapi.json</a></p></body></html>')

    routes = [Route(r.path, _task_endpoint(state, r), methods=["POST"]) for r in TASK_ROUTES]
    default_path = state.manifest.default_route or DEFAULT_ROUTE[state.task]
    default = next((r for r in TASK_ROUTES if r.path == default_path), None)
    if default is not None:
        routes.append(Route("/", _task_endpoint(state, default), methods=["POST"]))
    routes += [
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(_load(state))
        try:
            yield
        finally:
            state.draining = True
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.service is not None:
                await state.service.stop()

    return Starlette(routes=routes, lifespan=lifespan)


async def _load(state: AppState) -> None:
    """Load and warm the engine in the background: /health answers 503 until this is done."""
    try:
        engine = await asyncio.to_thread(state.load)
        service = InferenceService(engine, state.settings)
        service.start()
        await service.warmup()
    except BeiError as error:
        state.load_error = f"the engine failed to load: {error.message}"
        log.error(state.load_error)
        return
    except Exception as error:  # noqa: BLE001 - reported on /health and in the log
        state.load_error = f"the engine failed to load: {error!r}"
        log.exception("the engine failed to load")
        return
    state.service = service
    log.info("engine %s ready: task %s, backend %s", state.manifest.name, state.manifest.task, state.manifest.target.name)


def app_for_engine(folder: Path, settings: ServeSettings) -> Starlette:
    """The app serving one engine directory (its manifest is checked now, its backend loads in the background)."""
    from bei.engine.compat import check_compatible
    from bei.engine.manifest import read_manifest

    manifest = read_manifest(folder)
    check_compatible(manifest)
    state = AppState(settings=settings, manifest=manifest, load=lambda: load_engine(folder, threads=settings.engine_threads))
    return create_app(state)
