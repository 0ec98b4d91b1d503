"""`bei serve --http2`: hypercorn serves HTTP/1.1 and HTTP/2 cleartext (h2c with prior knowledge, as
Baseten's performance client and gRPC-style clients open it) on one port, with the same app.

The app's guards hold on either server: the API key, the body timeout (408), the payload and
concurrency limits, and SIGTERM's drain (AppState.drain: 503 to new requests, in-flight requests
finish, stalled ones answered 503, exit 0). The request-head timeout is hypercorn's keep-alive
timeout set to --header-timeout: a connection whose first (or next) request head has not arrived
within it of the connection opening (or of the previous answer) is closed; under HTTP/2 the same
bound holds between streams. uvicorn with httptools stays the default: its HTTP/1.1 is faster
(scripts/bench_http.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import ASGIApp

from bei.api.state import ABANDON_GRACE_S, AppState


def config_for(state: AppState) -> Config:
    settings = state.settings
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.keep_alive_timeout = settings.header_timeout
    config.graceful_timeout = ABANDON_GRACE_S + 1  # the drain is done by then
    config.loglevel = settings.log_level.upper()
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through `bei serve`'s logging, once
    config.include_server_header = False
    return config


def serve_h2c(app: ASGIApp, state: AppState, *, uvloop: bool) -> None:
    """Run hypercorn until SIGTERM / SIGINT has drained the server (a second signal stops at once),
    or until an engine fails to load."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if uvloop:
        import uvloop as uvloop_module

        factory = uvloop_module.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(app, state))


async def _serve(app: ASGIApp, state: AppState) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    async def drain_then_stop() -> None:
        await state.drain()
        stop.set()

    def on_signal() -> None:
        if state.draining:  # a second signal: stop now
            stop.set()
            return
        state.draining = True
        task = loop.create_task(drain_then_stop())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    state.on_load_failure = stop.set
    await serve(app, config_for(state), shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
