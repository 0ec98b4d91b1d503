"""Serve an engine in this process: the real app under a real `uvicorn.Server`, on a background thread.

`with serve_engine(engine_dir, **settings) as base_url:` starts uvicorn on 127.0.0.1 (a free port),
waits until GET /health answers 200, yields `http://127.0.0.1:PORT` and stops the server on exit
(`should_exit`, then join). Much cheaper than a `bei serve` subprocess per engine: torch,
transformers and onnxruntime are already imported here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bei.api.app import create_app, state_for_engines
from bei.settings import ServeSettings

HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def _bound_socket(port: int) -> socket.socket:
    """A listening-ready socket on 127.0.0.1:`port` (0: a free port the kernel picks), bound before
    uvicorn starts so that no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.contextmanager
def serve_engine(engine_dir: Path | str | list[Path], **settings: Any) -> Iterator[str]:
    """Run the app for `engine_dir` (or several, served together as `bei serve A B` does) with
    `ServeSettings(**settings)`; yields the base URL once healthy.

    The server runs on a daemon thread (uvicorn installs no signal handlers off the main thread);
    on exit it is asked to stop (`should_exit`) and joined, forced if a connection keeps it busy.
    """
    settings.setdefault("log_level", "warning")
    settings.setdefault("engine_threads", 1)
    sock = _bound_socket(int(settings.pop("port", 0) or 0))
    port = int(sock.getsockname()[1])
    serve_settings = ServeSettings(host="127.0.0.1", port=port, **settings)
    try:
        folders = engine_dir if isinstance(engine_dir, list) else [Path(engine_dir)]
        app = create_app(state_for_engines(folders, serve_settings))
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level=serve_settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as err:  # noqa: BLE001 - reported to the caller
            failure.append(err)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, thread, failure)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():  # a connection that keeps it busy: force it
            server.force_exit = True
            thread.join(STOP_TIMEOUT_S)
        sock.close()


def _wait_healthy(base_url: str, thread: threading.Thread, failure: list[BaseException]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if failure:
                raise RuntimeError(f"the in-process server failed: {failure[0]!r}") from failure[0]
            if not thread.is_alive():
                raise RuntimeError("the in-process server stopped before it was healthy")
            try:
                response = client.get("/health")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text}"
                if "failed to load" in response.text:
                    raise RuntimeError(f"the engine failed to load: {last}")
            except httpx.TransportError as err:
                last = repr(err)
            time.sleep(0.05)
    raise TimeoutError(f"{base_url}/health not 200 after {HEALTH_TIMEOUT_S:.0f}s; last: {last}")


# --- building tiny engines, in worker processes ----------------------------------------------
def config_for(name: str, checkpoint: Path, base_model: str, default_route: str | None = None, **build: Any) -> dict[str, Any]:
    """A config.yaml mapping that builds the LOCAL checkpoint folder `checkpoint` as engine `name`;
    `cpu_precision` is fp32 unless given (the parity tests compare the fp32 engine with its reference)."""
    trt_llm: dict[str, Any] = {
        "build": {
            "base_model": base_model,
            "checkpoint_repository": {"source": "LOCAL", "repo": str(checkpoint)},
            "cpu_precision": "fp32",
            **build,
        }
    }
    if default_route is not None:
        trt_llm["runtime"] = {"webserver_default_route": default_route}
    return {"model_name": name, "trt_llm": trt_llm}


def base_model_for(model_type: str) -> str:
    """`encoder` for causal decoders, `encoder_bert` for BERT-like encoders."""
    from bei.modeling.detect import ARCHITECTURES

    return ARCHITECTURES[model_type]


def make_and_build(
    root: str,
    name: str,
    model_type: str,
    task: str,
    checkpoint_kwargs: dict[str, Any],
    build_kwargs: dict[str, Any],
    sync_tokenizer: bool = False,
) -> tuple[str, str, float]:
    """Write the tiny checkpoint `root/checkpoints/name` and build it into `root/engines/name/name`.

    `build_kwargs`: `trt_llm.build` fields, plus `default_route` and `target` (bei build --target). `sync_tokenizer`: rewrite
    tokenizer.json as transformers' AutoTokenizer loads it (see `sync_tokenizer_json`). Returns
    (checkpoint folder, engine folder, seconds). Runs in a worker process or inline.
    """
    from bei.build import build_engine
    from bei.config import parse_config
    from bei.progress import Progress
    from bei.testing.tiny_models import make_checkpoint

    started = time.perf_counter()
    base = Path(root)
    checkpoint = make_checkpoint(base / "checkpoints" / name, model_type, task, **checkpoint_kwargs)
    if sync_tokenizer:
        sync_tokenizer_json(checkpoint)
    build_kwargs = dict(build_kwargs)
    base_model = build_kwargs.pop("base_model", None) or base_model_for(model_type)
    target = build_kwargs.pop("target", "auto")
    result = build_engine(
        parse_config(config_for(name, checkpoint, base_model, **build_kwargs)),
        config_dir=base,
        # one engines root per engine: bei's staging cleanup (bei/engine/layout.py) globs
        # `.staging-<name>-*`, which also matches a concurrent build of `<name>-<suffix>`
        engines_root=base / "engines" / name,
        target=target,
        progress=Progress([], enabled=False),
    )
    return str(checkpoint), str(result.engine_dir), time.perf_counter() - started


def sync_tokenizer_json(folder: Path) -> None:
    """Rewrite `folder/tokenizer.json` as the tokenizer transformers' AutoTokenizer actually loads.

    transformers 5 does not trust the tokenizer class of some model types
    (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`, qwen2 among them): it loads their own class, which
    rebuilds the normalizer and pre-tokenizer (Qwen2: NFC and its digit-splitting regex) whatever
    tokenizer.json says. Real Qwen2 checkpoints ship exactly that in tokenizer.json; the generic
    byte-level tokenizer of a tiny checkpoint does not, so the references would tokenize differently
    from every tokenizer.json reader (bei, TEI). This makes the tiny checkpoint consistent, as real ones are.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.backend_tokenizer.save(str(Path(folder) / "tokenizer.json"))


def _worker_init() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)


class EngineBuilder:
    """Builds tiny engines ahead of the tests that use them, `workers` at a time (0: inline, on demand).

    `submit(name, model_type, task, checkpoint_kwargs, build_kwargs)` queues a build;
    `get(name)` waits for it and returns (checkpoint folder, engine folder). An export is mostly
    single-threaded Python work, so two worker processes nearly halve the time of a matrix of
    builds on two cores, and the tests compare one engine while the next ones build.
    """

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = Path(root)
        self.jobs: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], bool]] = {}
        self.futures: dict[str, Any] = {}
        self.results: dict[str, tuple[Path, Path]] = {}
        self.seconds: dict[str, float] = {}
        self._pool: Any = None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)

    def submit(
        self,
        name: str,
        model_type: str,
        task: str,
        checkpoint_kwargs: dict[str, Any] | None = None,
        build_kwargs: dict[str, Any] | None = None,
        sync_tokenizer: bool = False,
    ) -> None:
        if name in self.jobs:
            return
        job = (model_type, task, dict(checkpoint_kwargs or {}), dict(build_kwargs or {}), sync_tokenizer)
        self.jobs[name] = job
        if self._pool is not None:
            self.futures[name] = self._pool.submit(make_and_build, str(self.root), name, *job)

    def get(self, name: str) -> tuple[Path, Path]:
        """(checkpoint folder, engine folder) of a submitted build, waiting for it (or building it now)."""
        if name not in self.results:
            future = self.futures.pop(name, None)
            if future is not None:
                checkpoint, engine, seconds = future.result()
            else:
                checkpoint, engine, seconds = make_and_build(str(self.root), name, *self.jobs[name])
            self.results[name] = (Path(checkpoint), Path(engine))
            self.seconds[name] = seconds
        return self.results[name]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
