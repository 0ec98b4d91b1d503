"""`bei serve --ray`: bei's own Starlette app as a Ray Serve application.

Each replica is a Ray actor that builds the app of `bei serve` (`create_app(state_for_engines(...))`: the
same routes, batcher, metrics and errors) and runs its lifespan, which loads the engines; Ray Serve's
proxy on every node routes HTTP requests to the replicas. `build_app` is the application builder for a
Ray Serve config file (KubeRay's RayService: `import_path: bei.ray_serve:build_app`, docs/scale.md).

scaling: fixed replicas or Ray Serve's autoscaling, checked before Ray starts; metrics: /metrics of every
replica from any replica.

HTTP itself is Ray Serve's proxy's, not uvicorn's: --header-timeout does not apply; --drain-timeout is the
replicas' graceful shutdown. Every node reads the engine folders at the same path (a shared filesystem) and has the same bei
installed (`pip install 'bei[ray]'` plus `ray[serve]`). Nothing here imports ray until a function runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bei.api.app import create_app, state_for_engines
from bei.ray_serve.metrics import Publisher
from bei.ray_serve.scaling import Scaling
from bei.settings import ServeSettings

APP_NAME = "bei"


class BeiReplica:
    """One Ray Serve replica: the engines loaded by the app's lifespan, in this actor."""

    def __init__(self, engine_dirs: list[str], settings: dict[str, Any]) -> None:
        self.engine_dirs = [Path(d) for d in engine_dirs]
        self.settings = ServeSettings.model_validate(settings)

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve calls it once per replica, then runs the app's lifespan
        from ray import serve

        state = state_for_engines(self.engine_dirs, self.settings)
        context = serve.get_replica_context()
        publisher = Publisher(state.registry, context.replica_tag, context.app_name)
        state.registry = publisher.registry  # /metrics: every replica's figures, labelled by replica
        app = create_app(state)
        served = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(starlette: Any) -> AsyncIterator[None]:  # the app's own lifespan, plus the metrics publisher
            async with served(starlette):
                task = asyncio.get_running_loop().create_task(publisher.run())
                try:
                    yield
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        app.router.lifespan_context = lifespan
        return app


def application(engine_dirs: list[Path], settings: ServeSettings, *, scaling: Scaling, num_gpus: float = 0.0, num_cpus: float = 1.0) -> Any:
    """The Ray Serve application (a bound deployment) of these engines."""
    from ray import serve

    threads = settings.engine_threads or max(1, int(num_cpus))  # an engine call uses its replica's CPUs, not the node's
    values = settings.model_dump() | {"engine_threads": threads}
    deployment: Any = serve.deployment(
        name="bei",
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=settings.max_concurrent_requests,
        graceful_shutdown_timeout_s=settings.drain_timeout,  # a replica stopped finishes its requests first, as bei serve drains
        **scaling.deployment_options(),
    )(serve.ingress()(BeiReplica))
    return deployment.bind([str(Path(d).resolve()) for d in engine_dirs], values)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: `args` = {"engines": [...], "replicas": N (or "min_replicas", "max_replicas",
    "target_ongoing_requests"), "num_gpus": g, "num_cpus": c, **ServeSettings}."""
    args = dict(args)
    engines = [Path(p) for p in args.pop("engines")]
    scaling_values = {name: args.pop(name, None) for name in Scaling.model_fields}
    num_gpus, num_cpus = float(args.pop("num_gpus", 0)), float(args.pop("num_cpus", 1))
    settings = ServeSettings.model_validate(args)
    scaling = Scaling.of(scaling_values, settings.max_concurrent_requests)
    return application(engines, settings, scaling=scaling, num_gpus=num_gpus, num_cpus=num_cpus)


def start(
    engine_dirs: list[Path],
    settings: ServeSettings,
    *,
    scaling: Scaling,
    address: str | None = None,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    blocking: bool = True,
) -> None:
    """Deploy on Ray (a local one without `address`) and serve on settings.host:settings.port; with `blocking`, until
    SIGTERM or Ctrl-C, then drain: the application is deleted, which stops its routes taking requests and lets each
    replica finish those in flight (up to --drain-timeout), as `bei serve` drains."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False) if address is None else ray.init(address=address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = application(engine_dirs, settings, scaling=scaling, num_gpus=num_gpus, num_cpus=num_cpus)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    if blocking:
        _wait_for_stop()
        serve.delete(APP_NAME)


def _wait_for_stop() -> None:
    """Until SIGTERM or Ctrl-C. Ray's own SIGTERM handler would end this process at once, and the local Ray with it,
    requests in flight and all; a second signal while draining gets the handlers back (Ctrl-C: stop now)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
