"""Process lifecycle of `bei serve`: check the engines, start uvicorn (HTTP/1.1) or, with `--http2`,
hypercorn (HTTP/1.1 and HTTP/2 cleartext on one port, bei/h2c.py), drain on SIGTERM.

On SIGTERM (or Ctrl-C) the server first drains: /health answers 503 and new requests get 503
while the requests already accepted finish (up to `--drain-timeout`, 20 s by default); those still
running then are answered 503 (never 500), uvicorn shuts down and the process exits 0: under 30 s
in all by default. A second signal stops at once.

An engine that fails to load stops the server: `bei serve` exits 1 with the error.

uvicorn has no timeout for a request's head (a client may trickle headers forever): with httptools,
bei's protocol closes a connection whose request line and headers have not all arrived within
`--header-timeout` seconds of the connection or of the request's first byte.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from bei.api.app import create_app, state_for_engines
from bei.api.state import ABANDON_GRACE_S, AppState
from bei.errors import EngineError
from bei.settings import ServeSettings

log = logging.getLogger("bei")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        asyncio.get_event_loop().create_task(self._exit_when_drained())

    async def _exit_when_drained(self) -> None:
        await self.state.drain()
        # not super().handle_exit: uvicorn would re-raise the signal once stopped, so a clean drain
        # would end with "killed by SIGTERM" (-15 / 143) instead of exit status 0
        self.should_exit = True


def loop_and_http() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools (C) where installed (bei's
    dependencies, except uvloop on Windows), else asyncio's loop and h11 (pure Python)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def head_timeout_protocol(timeout: float) -> type[Any]:
    """uvicorn's httptools protocol, closing connections whose request head is not complete within
    `timeout` seconds (armed when the connection opens and when each request starts)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout, self._head_expired)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.info("closed a connection whose request head did not arrive within %gs", timeout)
                self.transport.close()

    return HeadTimeoutProtocol


def serve(engine_dirs: list[Path], settings: ServeSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = state_for_engines(engine_dirs, settings)
    loop, http = loop_and_http()
    if settings.http2:
        from bei.h2c import serve_h2c

        log.info("event loop %s, HTTP/1.1 and HTTP/2 cleartext by hypercorn", loop)
        serve_h2c(create_app(state), state, uvloop=loop == "uvloop")
    else:
        log.info("event loop %s, HTTP parser %s", loop, http)
        serve_uvicorn(state, loop, http)
    failed = [m.load_detail for m in state.models.values() if m.load_detail]
    if failed:  # a broken engine never serves: `bei serve` exits non-zero, naming what failed
        raise EngineError(failed[0])


def serve_uvicorn(state: AppState, loop: str, http: str) -> None:
    settings = state.settings
    config = uvicorn.Config(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(ABANDON_GRACE_S) + 1,  # the drain is done by then
        loop=loop,
        http=head_timeout_protocol(settings.header_timeout) if http == "httptools" else http,
    )
    server = DrainingServer(config, state)

    def stop_on_load_failure() -> None:
        server.should_exit = True

    state.on_load_failure = stop_on_load_failure
    server.run()
