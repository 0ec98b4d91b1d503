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
from collections.abc import Awaitable, Callable
from typing import Any

import h2.events
import h2.exceptions
import hypercorn.protocol
from h2.stream import StreamState
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.typing import AppWrapper, ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, ASGISendEvent, Scope, TaskGroup
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as StarletteScope

from bei.api.state import ABANDON_GRACE_S, AppState

WAKE_S = 0.5  # how long an HTTP/2 connection owing a request body may stay quiet before the server PINGs it
WAKE_PING = b"bei-wake"  # the PING's 8 bytes of opaque data
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)  # the client may still send DATA


class _StreamBodies:
    """The task group an HTTP/2 connection hands its streams: hypercorn's, except that each stream's app
    reads its request body from an unbounded queue whose chunks `FlowControlledH2Protocol` counts, so
    that handing a body chunk to an app never waits (hypercorn's own queue holds 10 chunks, and a full one
    blocked the connection's read loop, every stream on it with it)."""

    def __init__(self, task_group: TaskGroup, protocol: FlowControlledH2Protocol) -> None:
        self._task_group = task_group
        self._protocol = protocol

    async def spawn_app(
        self, app: AppWrapper, config: Config, scope: Scope, send: Callable[[ASGISendEvent | None], Awaitable[None]]
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        stream_id = self._protocol.opening
        queue: asyncio.Queue[ASGIReceiveEvent] = asyncio.Queue()  # bounded by the stream's flow-control window

        async def take() -> ASGIReceiveEvent:
            message = await queue.get()
            if message["type"] == "http.request":
                await self._protocol.body_taken(stream_id, len(message.get("body", b"")))
            return message

        async def with_receive(
            scope: Scope,
            receive: ASGIReceiveCallable,
            send: ASGISendCallable,
            sync_spawn: Callable[..., Any],
            call_soon: Callable[..., Any],
        ) -> None:
            await app(scope, take, send, sync_spawn, call_soon)

        await self._task_group.spawn_app(with_receive, config, scope, send)  # `receive`, its own queue, stays empty
        return queue.put

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._task_group.spawn(func, *args)


class FlowControlledH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol with a stream's request body paced by HTTP/2 flow control instead of a
    queue that blocks the connection: the connection's window reopens as DATA arrives, a stream's as its
    app takes the chunks (at most the stream's window, 64 KiB, waits per stream).

    An answer given before the whole request body came (401, 413) ends the stream for the app: the chunks
    it left are given back to the stream's window, and DATA still arriving for it is dropped and given back
    too, so the client finishes its upload, reads its answer and the connection carries on. hypercorn 0.18
    instead closed the connection on such DATA (pgjones/hypercorn#329) or, with its queue full, stalled it.

    A connection that has gone quiet for `WAKE_S` while a request body is still due and the client may send
    it is sent a PING: httpx (httpcore 1.0.9) uploading several bodies at once on one connection can wait on
    a read for a WINDOW_UPDATE another of its streams has already read (pydantic/httpx2#1133), and any frame
    from the server wakes it to see its window open."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opening = 0  # the stream whose app _create_stream is starting
        self.unread: dict[int, int] = {}  # bytes handed to a stream's app, not taken yet
        self.task_group = _StreamBodies(self.task_group, self)  # type: ignore[assignment]
        self.heard = 0.0  # the loop's time when the client last sent bytes
        self.gone = asyncio.Event()

    async def initiate(self, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None) -> None:
        await super().initiate(headers, settings)
        self.heard = asyncio.get_running_loop().time()
        self.task_group.spawn(self._wake_quiet_uploads)

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData):
            self.heard = asyncio.get_running_loop().time()
        elif isinstance(event, Closed):
            self.gone.set()
        await super().handle(event)

    async def _wake_quiet_uploads(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.gone.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKE_S):
                    await self.gone.wait()
            if not self.gone.is_set() and loop.time() - self.heard >= WAKE_S and self._body_may_come():
                with contextlib.suppress(h2.exceptions.ProtocolError):  # the connection is closing
                    self.connection.ping(WAKE_PING)
                await self._flush()

    def _body_may_come(self) -> bool:
        """Whether the client is still sending a request body it has window for."""
        return any(
            stream.state_machine.state in _SENDING and self.connection.remote_flow_control_window(stream_id) > 0
            for stream_id, stream in self.connection.streams.items()
        )

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        self.opening = request.stream_id
        self.unread[request.stream_id] = 0
        await super()._create_stream(request)
        if not isinstance(self.streams.get(request.stream_id), HTTPStream):  # a websocket (CONNECT): hypercorn's way
            del self.unread[request.stream_id]

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:  # one at a time: a RequestReceived earlier in `events` opens the stream of later DATA
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:  # answered: dropped
                self._open_window(None, event.flow_controlled_length)
                self._open_window(event.stream_id, event.flow_controlled_length)
                await self._flush()
            elif isinstance(event, h2.events.DataReceived) and event.stream_id in self.unread:
                await self.streams[event.stream_id].handle(Body(stream_id=event.stream_id, data=event.data))
                self.unread[event.stream_id] += len(event.data)
                self._open_window(None, event.flow_controlled_length)
                self._open_window(event.stream_id, event.flow_controlled_length - len(event.data))  # padding
                await self._flush()
            else:
                await super()._handle_events([event])

    async def body_taken(self, stream_id: int, length: int) -> None:
        if length and stream_id in self.unread:
            self.unread[stream_id] -= length
            self._open_window(stream_id, length)
            await self._flush()

    async def _close_stream(self, stream_id: int) -> None:
        if left := self.unread.pop(stream_id, 0):
            self._open_window(stream_id, left)
            await self._flush()
        await super()._close_stream(stream_id)

    def _open_window(self, stream_id: int | None, length: int) -> None:
        """Let the client send `length` more bytes on the connection (`stream_id` None) or on `stream_id`, if it
        is still sending there. Every window this protocol reopens goes through here, none through h2's
        `acknowledge_received_data`, whose deferred bookkeeping would lose bytes reopened beside it."""
        if length <= 0:
            return
        if stream_id is not None:
            stream = self.connection.streams.get(stream_id)
            if stream is None or stream.state_machine.state not in _SENDING:
                return
        self.connection.increment_flow_control_window(length, stream_id)


def reading_unread_bodies(app: ASGIApp, timeout: float) -> ASGIApp:
    """`app`, then the rest of a request body it answered without reading (401, 413), read and dropped
    for up to `timeout` seconds: hypercorn hands body chunks to the app through a bounded queue, and a
    chunk that nobody takes blocks the whole connection (and, under HTTP/2, every stream on it)."""

    async def wrapped(scope: StarletteScope, receive: Receive, send: Send) -> None:
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

    hypercorn.protocol.H2Protocol = FlowControlledH2Protocol  # type: ignore[misc]  # what its ProtocolWrapper starts for h2
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    state.on_load_failure = stop.set
    app = reading_unread_bodies(app, state.settings.body_timeout)
    await serve(app, config_for(state), shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
