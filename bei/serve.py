"""Process lifecycle of `bei serve`: check the engine, start uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from bei.api.app import app_for_engine
from bei.settings import ServeSettings


def serve(engine_dir: Path, settings: ServeSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = app_for_engine(engine_dir, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        limit_concurrency=None,
    )
    uvicorn.Server(config).run()
