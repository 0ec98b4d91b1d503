"""What a server holds: the models it serves (each loaded once), and which one a request means."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from bei.api.metrics import EngineFigures, Metrics, registry_for
from bei.api.routes import TaskRoute, routes_for
from bei.engine.manifest import Manifest
from bei.errors import ModelNotFoundError, NotReadyError, ValidationError, WrongRouteError
from bei.inference import InferenceService
from bei.kinds import Task
from bei.settings import ServeSettings
from bei.targets.loading import LoadedEngine
from bei.telemetry import SIZE_BUCKETS, TIME_BUCKETS, Histogram

ABANDON_GRACE_S = 2.0  # after the drain timeout: for the abandoned requests' 503s to go out
log = logging.getLogger("bei")


@dataclass
class ServedModel:
    name: str
    manifest: Manifest
    load: Callable[[], LoadedEngine]
    service: InferenceService | None = None
    load_error: str | None = None  # what clients read (/health, 503s): no paths, no runtime internals
    load_detail: str | None = None  # the whole error, for the log and `bei serve`'s exit message

    @property
    def task(self) -> Task:
        return self.manifest.task


@dataclass
class AppState:
    settings: ServeSettings
    models: dict[str, ServedModel]
    draining: bool = False
    in_flight: int = 0  # requests whose body is read, until answered
    receiving: int = 0  # requests whose body is being read (bounded by --body-timeout)
    abandon: asyncio.Event = field(default_factory=asyncio.Event)  # set when SIGTERM's drain stops waiting
    metrics: Metrics = field(default_factory=Metrics)
    on_load_failure: Callable[[], None] | None = None  # `bei serve`: stop, and exit non-zero
    registry: CollectorRegistry = field(init=False, repr=False)  # this app's /metrics, never the global one

    def __post_init__(self) -> None:
        self.registry = registry_for(self.metrics, self.engine_figures)

    def engine_figures(self) -> EngineFigures:
        """The loaded engines' figures, summed: what /metrics reads at each scrape."""
        services = [m.service for m in self.models.values() if m.service is not None]
        return EngineFigures(
            batches=sum(s.batcher.batches_run for s in services),
            dropped=sum(s.batcher.dropped for s in services),
            queue_depth=sum(len(s.batcher.queue) for s in services),
            in_flight=self.in_flight,
            batch_sizes=Histogram.combined([s.batcher.batch_sizes for s in services], SIZE_BUCKETS),
            batch_tokens=Histogram.combined([s.batcher.batch_tokens for s in services], SIZE_BUCKETS),
            tokenization_time=Histogram.combined([s.tokenization_time for s in services], TIME_BUCKETS),
        )

    def ready(self, model: ServedModel) -> InferenceService:
        if self.draining:
            raise NotReadyError("the server is shutting down")
        if model.service is None:
            raise NotReadyError(model.load_error or f"model {model.name!r} is loading")
        return model.service

    async def drain(self) -> None:
        """SIGTERM's drain, whichever server runs: new requests already get 503 (`draining`); wait for
        those being read or answered, up to --drain-timeout; then answer those left 503 (`abandon`)
        and give their answers ABANDON_GRACE_S to go out."""
        self.draining = True
        log.info("draining: %d requests in flight", self.in_flight)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.in_flight + self.receiving > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight + self.receiving > 0:
            log.warning("drain timeout: answering %d requests still in flight with 503", self.in_flight + self.receiving)
            self.abandon.set()
            deadline = time.monotonic() + ABANDON_GRACE_S
            while self.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    @property
    def all_ready(self) -> bool:
        return not self.draining and all(m.service is not None for m in self.models.values())

    def pick(self, route: TaskRoute, requested: str | None, prefix: str | None = None, path: str | None = None) -> ServedModel:
        """The model a request means: its path prefix, else its `model` field when served, else the
        only model, else the only model whose task fits the route (posted to `path`, else `route.path`)."""
        names = ", ".join(self.models)
        where = path or route.path
        if prefix is not None:
            if prefix not in self.models:
                raise ModelNotFoundError(f"model {prefix!r} is not served here; served: {names}")
            chosen = self.models[prefix]
        elif requested in self.models:
            chosen = self.models[requested]
        elif len(self.models) == 1:
            chosen = next(iter(self.models.values()))  # one model: `model` is optional and free-form
        else:
            fitting = [m for m in self.models.values() if m.task in route.tasks]
            if len(fitting) == 1:
                chosen = fitting[0]
            elif requested is not None:
                raise ModelNotFoundError(f"model {requested!r} is not served here; served: {names}")
            elif not fitting:
                raise WrongRouteError(f"{where}: none of the served models ({names}) can serve it")
            else:
                raise ValidationError(
                    f"model: several served models fit {where} ({', '.join(m.name for m in fitting)}); "
                    f"name one in `model` or post to /<model>{where}"
                )
        if chosen.task not in route.tasks:
            raise WrongRouteError(
                f"{where} cannot serve the {chosen.task.value} model {chosen.name!r}; its routes are: " + ", ".join(routes_for(chosen.task))
            )
        return chosen
