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
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import h2.events
import hypercorn.protocol
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.protocol.h2 import H2Protocol
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bei.api.state import ABANDON_GRACE_S, AppState


class EarlyAnswerH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol, surviving an answer sent before the whole request body came (401,
    413): hypercorn 0.18 looks up the finished stream for the body's next DATA frame, and the KeyError
    closes the connection and every other stream on it (pgjones/hypercorn#329; fixes proposed in #312,
    #334). The rest of that body is dropped, its bytes given back to the connection's flow control."""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:  # one at a time: a RequestReceived earlier in `events` opens the stream of later DATA
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                await self._flush()
            else:
                await super()._handle_events([event])


def reading_unread_bodies(app: ASGIApp, timeout: float) -> ASGIApp:
    """`app`, then the rest of a request body it answered without reading (401, 413), read and dropped
    for up to `timeout` seconds: hypercorn hands body chunks to the app through a bounded queue, and a
    chunk that nobody takes blocks the whole connection (and, under HTTP/2, every stream on it)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        finished = scope["type"] != "http"

        async def tracked() -> Message:
            nonlocal finished
            message = await receive()
            finished = finished or message["type"] == "http.disconnect" or not message.get("more_body", False)
            return message

        await app(scope, tracked, send)
        if not finished:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while not finished:
                        await tracked()

    return wrapped


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

    hypercorn.protocol.H2Protocol = EarlyAnswerH2Protocol  # type: ignore[misc]  # what its ProtocolWrapper starts for h2
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    state.on_load_failure = stop.set
    app = reading_unread_bodies(app, state.settings.body_timeout)
    await serve(app, config_for(state), shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
