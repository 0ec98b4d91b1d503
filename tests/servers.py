"""Shared helpers for tests that run the real `bei` CLI: `bei` subprocesses, `bei serve` servers, numbers.

Plain functions, classes and constants, imported by name (`from tests.servers import Server, run_bei`).
The session's MiniLM engine, its server and the sentence-transformers models are fixtures in
tests/conftest.py (`minilm_build`, `minilm_server`, `http`, `st_model`, `st_model_unnormalized`):
tests name them as arguments and import nothing for them.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
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


@atexit.register
def _clean_up() -> None:
    """Servers that nothing stopped (an interrupted session)."""
    for server in _live:
        server.stop()


def minilm_fp32_config(folder: Path) -> Path:
    """MINILM_CONFIG pinned to the fp32 engine (`cpu_precision: fp32`), written into `folder`: the
    engine the parity tests compare with sentence-transformers, built through its six stages."""
    import yaml

    data = yaml.safe_load(MINILM_CONFIG.read_text())
    data["trt_llm"]["build"]["cpu_precision"] = "fp32"
    path = folder / "all-minilm-l6-v2-fp32.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- the session's engine ---------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltEngine:
    """What tests/conftest.py's `minilm_build` fixture made: `bei build` of MINILM_CONFIG."""

    engines_dir: Path
    engine_dir: Path
    config: Path
    stderr: str
    seconds: float


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
    for i, (a, e) in enumerate(zip(actual, expected, strict=False)):
        c = cosine(a, e)
        assert c >= min_cosine, f"{what} row {i}: cosine {c:.7f} < {min_cosine}"
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(e), rtol=1e-3, err_msg=f"{what} row {i}: norm")


def assert_fp32_parity(got: Any, want: Any, what: str, max_abs_diff: float = 1e-4) -> None:
    """The fp32 parity of the architecture tests: same shape, max abs diff <= 1e-4 and each row's
    cosine (rows = first axis, flattened) >= MIN_COSINE."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    assert np.abs(got - want).max() <= max_abs_diff, f"{what}: max abs diff {np.abs(got - want).max():.2e}"
    flat_got, flat_want = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
    cosines = (flat_got * flat_want).sum(1) / (np.linalg.norm(flat_got, axis=1) * np.linalg.norm(flat_want, axis=1))
    assert cosines.min() >= MIN_COSINE, f"{what}: min cosine {cosines.min():.7f} (row {cosines.argmin()})"


def fp8_plan_away_from_gpu(spec: Any, target: str) -> Any:
    """The FP8 build plan of `spec` for a GPU `target` (tensorrt, torch), made on a machine without one."""
    from bei.buildsteps.plan import TargetChoice
    from bei.hardware import Host
    from bei.targets.plan import make_plan

    return make_plan(
        spec,
        target=TargetChoice(target, "test"),
        base_model=spec.base_model,
        quantization="fp8",
        max_num_tokens=16384,
        max_batch_size=256,
        accelerator="H100",
        host=Host(versions={"onnxruntime": "1.32.0"}),
    )


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")
