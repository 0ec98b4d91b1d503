#!/usr/bin/env python
"""Benchmark bei against its peers on this machine, all in one run, and print ratios to bei.

    python scripts/bench.py --quick                        # ~2 minutes on an idle 2-core machine
    python scripts/bench.py --setup-infinity --quick       # first creates .bench/infinity-venv
    python scripts/bench.py --workloads medium --batch-sizes 32 --concurrency 1,8 --duration 10

Model: the config's checkpoint (all-MiniLM-L6-v2 by default); its bei engine is built first when
none is up to date. Peers:

- `bei`: `bei serve` in a subprocess, over HTTP (`/embed`, `truncate: true`), driven by
  `bei.client.AsyncClient`.
  Its engine is what `bei build` makes of the config by default (`cpu_precision: auto`: the fastest
  verified CPU engine of this host; the output names it).
- `bei-fp32` (only when asked for in `--peers`): the config pinned to the fp32 engine
  (`cpu_precision: fp32`, a copy written to `.bench/configs/`).
- `bei-int8` (only when asked for in `--peers`): the same with the INT8 CPU engine of `--int8-config`
  (`quantization_type: int8`), reported separately from the fp32 goals; its ratio is to fp32 bei.
- `bei-bf16`: the same with the bf16 CPU engine of `--bf16-config` (`cpu_precision: bf16`: bf16
  GEMMs with fp32 accumulation, the rest fp32); by default only where the CPU has bf16 units.
- `sentence-transformers`: the library in-process, `SentenceTransformer(folder, device="cpu")
  .encode(texts, batch_size=32)` with `torch.set_num_threads(2)`, run in a worker process of this
  script; it has no concurrency, so it is measured at concurrency 1 only.
- `sentence-transformers-bf16`: the same with bf16 weights (`model_kwargs={"torch_dtype":
  torch.bfloat16}`), the one keyword a user would try; by default only where the CPU has bf16 units.

Each peer's min cosine to sentence-transformers fp32 on the first texts of every workload is
reported beside its speed.
- `infinity-torch`, `infinity-optimum`: Infinity (`infinity-emb`) in its own virtual environment
  `.bench/infinity-venv` (`--setup-infinity` creates it), over HTTP (`/embeddings`) with the same
  client. Its ONNX engine reads a `model.onnx` exported by optimum into a copy of the model folder
  whose `max_position_embeddings` is set to the model's max_seq_length, so that it truncates where
  the others do.

Every cell (peer, workload, client batch size, concurrency) reports embeddings/s, tokens/s (real
tokens after truncation, counted with the model's tokenizer), p50/p99 request latency, the peak
RSS and the CPU time per embedding of the serving process during the cell, and the ratio of the
peer's throughput to bei's in the same cell. Cells are interleaved (each cell runs every peer in
turn), so load from other work on the machine hits all peers alike and the ratios stay meaningful
when the absolute figures do not. A peer that cannot be installed or started is reported as such;
its figures are never estimated. docs/benchmarks.md has a run and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
INFINITY_VENV = BENCH_DIR / "infinity-venv"
INFINITY_VERSION = "0.0.78"
TORCH_VERSION = "2.13.0"
ST_BATCH_SIZE = 32
TORCH_THREADS = 2
CORPUS_SIZE = 512
START_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 900.0
MAX_CONCURRENCY = 100  # httpx's default pool, which bei.client.AsyncClient keeps

# target token counts (with [CLS] and [SEP]); "long" is over the model's 256-token limit on purpose
WORKLOADS = {"short": 10, "medium": 128, "long": 500}
PEERS = [
    "bei", "bei-fp32", "bei-int8", "bei-bf16", "sentence-transformers", "sentence-transformers-bf16", "infinity-torch", "infinity-optimum",
]  # fmt: skip
# quantized peers: run only when asked for; their vectors only come close to sentence-transformers'
INT8_PEERS = {"bei-int8", "bei-fp32"}  # (and the pinned fp32 engine: asked for, not by default)
# bf16 peers: by default where the CPU has bf16 units (elsewhere bf16 is emulated, slower than fp32)
BF16_PEERS = {"bei-bf16", "sentence-transformers-bf16"}
# the cosine to sentence-transformers fp32 below which a peer is flagged
MIN_AGREEMENT = {"bei-int8": 0.995, "sentence-transformers-bf16": 0.99, "bei-bf16": 0.9999, "bei": 0.999}


def default_peers() -> list[str]:
    from bei.hardware import detect_host

    bf16 = bool(detect_host(gpu=False).bf16_units)
    return [p for p in PEERS if p not in INT8_PEERS and (bf16 or p not in BF16_PEERS)]


DEFAULT_PEERS = default_peers()
FULL = {"workloads": "short,medium,long", "batch_sizes": "1,32,128", "concurrency": "1,8,64", "duration": 5.0}
QUICK = {"workloads": "short,medium,long", "batch_sizes": "1,32", "concurrency": "1,4", "duration": 1.0}

WORDS = """
the of and to in is was for on that with as by at from his her they this have are not be one had
which you were but all she there would their we him been has when who will more no if out so said
what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state
good very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used
take three states himself few house use during without again place around however home small
found thought went say part once general high upon school every does got united left number
course war until always away something fact though water less public put think almost hand enough
far took head yet government system better set told nothing night end why called find going look
asked later point knew city next program business give group toward young days let room president
side social given present several order national possible rather second face per among form
important often things looked early white case john become large big need four within felt along
children saw best church ever least power development light thing seemed family interest want
members others mind country area done turned although open god service certain kind problem began
different door thus help sense means whole matter perhaps itself york times law human line above
name example action company hands local show whether five history gave today either act feet
across taken past quite anything seen having death week experience body word half really field
am car words already themselves information tell together college shall money period held keep
sure probably free seems political real behind cannot miss question air office making brought
whose special major heard problems federal became study ago moment available known result street
economic boy position reason change south board individual job areas society west close turn love
community true court force full seem am policy million control data""".split()


# --- the workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    target_tokens: int
    texts: list[str]
    tokens: list[int]  # real tokens of each text as the model sees it (after truncation)

    def batch(self, index: int, size: int) -> tuple[list[str], int]:
        """The `index`-th request's texts (consecutive, wrapping around) and their token count."""
        start = (index * size) % len(self.texts)
        picks = [(start + k) % len(self.texts) for k in range(size)]
        return [self.texts[i] for i in picks], sum(self.tokens[i] for i in picks)


def make_workload(name: str, target: int, tokenizer_file: Path, max_tokens: int, count: int = CORPUS_SIZE) -> Workload:
    """`count` texts of about `target` tokens each, from the word list, the same on every run."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_file(str(tokenizer_file))
    plain.no_truncation()
    plain.no_padding()
    rng = random.Random(f"bei-bench-{name}")
    texts: list[str] = []
    for _ in range(count):
        sentences, words = [], 0
        while words < target + 8:  # a few words over the target; cut back below
            length = rng.randint(6, 16)
            sentence = [rng.choice(WORDS) for _ in range(length)]
            sentences.append(" ".join(sentence).capitalize() + ".")
            words += length + 1
        text = " ".join(sentences)
        encoding = plain.encode(text)
        last = min(target - 2, len(encoding.ids) - 2)  # content tokens between [CLS] and [SEP]
        # cut at a word boundary at or before the target
        while last > 1 and (end := encoding.offsets[last][1]) < len(text) and text[end] != " ":
            last -= 1
        texts.append(text[: encoding.offsets[last][1]])
    truncating = Tokenizer.from_file(str(tokenizer_file))
    truncating.no_padding()
    truncating.enable_truncation(max_tokens)
    tokens = [len(e.ids) for e in truncating.encode_batch(texts)]
    return Workload(name, target, texts, tokens)


def add_engine_arguments(p: argparse.ArgumentParser, rounds: int) -> None:
    """The arguments the per-core scripts share (cpu_roofline.py, cpu_parts.py): the engine, the
    workload and how many of its texts, the batch size and the timed rounds."""
    p.add_argument("engine", type=Path, nargs="?", default=Path("engines/all-minilm-l6-v2"))
    p.add_argument("--workload", choices=list(WORKLOADS), default="medium")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=rounds)


def engine_workload(args: argparse.Namespace, max_tokens: int) -> Workload:
    """`args.texts` texts of `args.workload` for the engine of `add_engine_arguments`, cut at `max_tokens`."""
    return make_workload(args.workload, WORKLOADS[args.workload], args.engine / "tokenizer.json", max_tokens, args.texts)


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class Budget:
    """When a cell stops: after `requests` requests, or when `duration` seconds have passed
    (requests in flight then still finish and count)."""

    requests: int | None
    duration: float

    def more(self, index: int, started: float) -> bool:
        if self.requests is not None:
            return index < self.requests
        return time.perf_counter() - started < self.duration


@dataclass
class Cell:
    peer: str
    workload: str
    batch_size: int
    concurrency: int
    status: str = "ok"
    requests: int = 0
    embeddings: int = 0
    tokens: int = 0
    seconds: float = 0.0
    embeddings_per_s: float | None = None
    tokens_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mib: float | None = None
    cpu_ms_per_embedding: float | None = None  # the serving process's CPU time
    ratio_to_bei: float | None = None

    def finish(self, latencies: list[float]) -> None:
        self.requests = len(latencies)
        if latencies and self.seconds > 0:
            self.embeddings_per_s = self.embeddings / self.seconds
            self.tokens_per_s = self.tokens / self.seconds
            self.p50_ms = float(np.percentile(latencies, 50) * 1000)
            self.p99_ms = float(np.percentile(latencies, 99) * 1000)


class ProcessMonitor:
    """What a serving process (with its children) used while the block ran: peak resident memory
    (psutil sampled every 20 ms, else the kernel's lifetime peak VmHWM of the process alone) and
    CPU seconds (user + system; on a shared machine this holds better than throughput)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_bytes = 0
        self.cpu_seconds: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _tree(self) -> list[Any]:
        return [self._process, *self._process.children(recursive=True)]

    def _cpu(self) -> float:
        if self._thread is not None:
            return sum(sum(p.cpu_times()[:2]) for p in self._tree())
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def __enter__(self) -> ProcessMonitor:
        try:
            import psutil

            self._process = psutil.Process(self.pid)
            self._thread = threading.Thread(target=self._sample, daemon=True)
        except ImportError:
            pass
        with contextlib.suppress(Exception):
            self._cpu_before = self._cpu()
        if self._thread is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in self._tree()))
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.cpu_seconds = self._cpu() - self._cpu_before
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_bytes = int(line.split()[1]) * 1024

    @property
    def mib(self) -> float | None:
        return self.peak_bytes / 2**20 if self.peak_bytes else None


# --- peers ---------------------------------------------------------------------------------------


class PeerUnavailable(Exception):
    """A peer that could not be installed or started: reported, never estimated."""


def stop_process(process: subprocess.Popen[Any] | None) -> None:
    """Terminate a server process, killing it if it has not exited within 30 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


class Peer:
    name: str
    pid: int
    version: str = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> np.ndarray:
        """Vectors of `texts`, for the agreement check."""
        raise NotImplementedError

    def run_cell(self, cell: Cell, workload: Workload, budget: Budget) -> list[float]:
        """Fill the cell's counters and return its request latencies."""
        raise NotImplementedError


class HttpPeer(Peer):
    """A server in a subprocess, driven by bei's client (`bei.client.AsyncClient`), `concurrency`
    requests in flight."""

    path = "/"
    health_path = "/health"

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], Path | None, dict[str, str]]:
        """argv, working directory, extra environment."""
        raise NotImplementedError

    def body(self, texts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def vectors(self, payload: Any) -> list[list[float]]:
        raise NotImplementedError

    def start(self) -> None:
        import httpx

        argv, cwd, env = self.command()
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"exited with {self.process.returncode} while starting: {self._log_tail()}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise PeerUnavailable(f"not healthy after {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])[-600:] + f" (log: {self.log_path})"

    def stop(self) -> None:
        stop_process(self.process)

    def embed(self, texts: list[str]) -> np.ndarray:
        import httpx

        response = httpx.post(self.base_url + self.path, json=self.body(texts), timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return np.asarray(self.vectors(response.json()), dtype=np.float32)

    def run_cell(self, cell: Cell, workload: Workload, budget: Budget) -> list[float]:
        return asyncio.run(self._run_cell(cell, workload, budget))

    async def _run_cell(self, cell: Cell, workload: Workload, budget: Budget) -> list[float]:
        from bei.client import AsyncClient, RetryPolicy

        latencies: list[float] = []
        counter = itertools.count()
        # no retries: a refused request is a failed cell, not a slow one
        async with AsyncClient(
            self.base_url, max_concurrency=cell.concurrency, timeout=REQUEST_TIMEOUT_S, retry=RetryPolicy(attempts=0)
        ) as client:
            started = time.perf_counter()

            async def worker() -> None:
                while budget.more(index := next(counter), started):
                    texts, tokens = workload.batch(index, cell.batch_size)
                    sent = time.perf_counter()
                    answer = await client.post(self.path, self.body(texts))
                    latencies.append(time.perf_counter() - sent)
                    if len(self.vectors(answer)) != len(texts):
                        raise RuntimeError(f"{len(self.vectors(answer))} vectors for {len(texts)} inputs")
                    cell.embeddings += len(texts)
                    cell.tokens += tokens

            await asyncio.gather(*(worker() for _ in range(cell.concurrency)))
            cell.seconds = time.perf_counter() - started
        return latencies


class BeiPeer(HttpPeer):
    name = "bei"
    path = "/embed"

    def __init__(self, log_dir: Path, engine_dir: Path, serve_args: list[str], name: str = "bei") -> None:
        self.name = name
        super().__init__(log_dir)
        self.engine_dir = engine_dir
        self.serve_args = serve_args
        from bei import __version__

        self.version = __version__

    def command(self) -> tuple[list[str], Path | None, dict[str, str]]:
        argv = [
            sys.executable,
            "-m",
            "bei.cli",
            "serve",
            str(self.engine_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.serve_args,
        ]
        return argv, None, {}

    def body(self, texts: list[str]) -> dict[str, Any]:
        return {"inputs": texts, "truncate": True}

    def vectors(self, payload: Any) -> list[list[float]]:
        return payload


class InfinityPeer(HttpPeer):
    path = "/embeddings"
    served_name = "bench-model"

    def __init__(self, log_dir: Path, engine: str, model_dir: Path) -> None:
        self.name = f"infinity-{engine}"
        super().__init__(log_dir)
        self.engine = engine
        self.model_dir = model_dir
        self.version = INFINITY_VERSION

    def command(self) -> tuple[list[str], Path | None, dict[str, str]]:
        executable = INFINITY_VENV / "bin" / "infinity_emb"
        if not executable.exists():
            raise PeerUnavailable(f"{INFINITY_VENV} is missing: run with --setup-infinity")
        argv = [
            str(executable),
            "v2",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--engine",
            self.engine,
            "--device",
            "cpu",
            "--served-model-name",
            self.served_name,
            "--log-level",
            "warning",
        ]
        cwd = None
        if self.engine == "optimum":
            if not (self.model_dir / "model.onnx").exists():
                raise PeerUnavailable(f"{self.model_dir}/model.onnx is missing: run with --setup-infinity")
            # optimum-onnx cannot find model.onnx through an absolute --model-id; its default pooling is CLS
            argv += ["--model-id", ".", "--pooling-method", "mean"]
            cwd = self.model_dir
        else:
            argv += ["--model-id", str(self.model_dir)]
        return argv, cwd, {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}

    def body(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.served_name, "input": texts}

    def vectors(self, payload: Any) -> list[list[float]]:
        return [item["embedding"] for item in payload["data"]]


class TorchWorker(Peer):
    """sentence-transformers in a worker process (this script with --worker), one JSON line per
    command; a worker of its own also measures the machine's matmul FLOP/s."""

    name = "sentence-transformers"

    def __init__(self, model_dir: Path, log_dir: Path, dtype: str = "fp32") -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self.name = "sentence-transformers" if dtype == "fp32" else f"sentence-transformers-{dtype}"
        self.log_path = log_dir / f"{self.name}.log"
        self.process: subprocess.Popen[str] | None = None
        self._sent: set[str] = set()

    def start(self) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(self.model_dir), "--worker-dtype", self.dtype]
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.pid = self.process.pid

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise PeerUnavailable("the worker exited: " + " | ".join(tail))
        answer = json.loads(line)
        if "error" in answer:
            raise PeerUnavailable(answer["error"])
        return answer

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(30)

    def embed(self, texts: list[str]) -> np.ndarray:
        answer = self.call({"cmd": "embed", "texts": texts})
        self.version = answer["version"]
        return np.asarray(answer["vectors"], dtype=np.float32)

    def hardware(self, seq_len: int) -> dict[str, Any]:
        """The matmul limit and the model's FLOPs per token, in a worker that then exits."""
        try:
            self.start()
            return self.call({"cmd": "hardware", "seq_len": seq_len})
        except PeerUnavailable as err:
            return {"error": str(err)}
        finally:
            self.stop()

    def run_cell(self, cell: Cell, workload: Workload, budget: Budget) -> list[float]:
        if workload.name not in self._sent:
            self.call({"cmd": "workload", "name": workload.name, "texts": workload.texts, "tokens": workload.tokens})
            self._sent.add(workload.name)
        answer = self.call(
            {
                "cmd": "cell",
                "workload": workload.name,
                "batch_size": cell.batch_size,
                "requests": budget.requests,
                "duration": budget.duration,
            }
        )
        cell.embeddings, cell.tokens, cell.seconds = answer["embeddings"], answer["tokens"], answer["seconds"]
        return answer["latencies"]


def worker_main(model_dir: str, dtype: str = "fp32") -> None:
    """The torch side of TorchWorker: commands on stdin, answers on stdout."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not break the protocol
    model: Any = None
    workloads: dict[str, Workload] = {}

    def loaded() -> Any:
        nonlocal model
        if model is None:
            from sentence_transformers import SentenceTransformer

            kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if dtype == "bf16" else {}
            model = SentenceTransformer(model_dir, device="cpu", **kwargs)
            model.encode(["warm up"] * ST_BATCH_SIZE, batch_size=ST_BATCH_SIZE)
        return model

    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer: dict[str, Any]
            if command["cmd"] == "embed":
                import sentence_transformers

                vectors = loaded().encode(command["texts"], batch_size=ST_BATCH_SIZE).astype(np.float32)
                answer = {"vectors": vectors.tolist(), "version": sentence_transformers.__version__}
            elif command["cmd"] == "workload":
                workloads[command["name"]] = Workload(command["name"], 0, command["texts"], command["tokens"])
                answer = {}
            elif command["cmd"] == "cell":
                workload, size = workloads[command["workload"]], command["batch_size"]
                budget = Budget(command["requests"], command["duration"])
                latencies, embeddings, tokens = [], 0, 0
                started = time.perf_counter()
                for index in itertools.count():
                    if not budget.more(index, started):
                        break
                    texts, count = workload.batch(index, size)
                    sent = time.perf_counter()
                    loaded().encode(texts, batch_size=ST_BATCH_SIZE)
                    latencies.append(time.perf_counter() - sent)
                    embeddings, tokens = embeddings + len(texts), tokens + count
                answer = {"latencies": latencies, "embeddings": embeddings, "tokens": tokens, "seconds": time.perf_counter() - started}
            elif command["cmd"] == "hardware":
                answer = hardware_limits(model_dir, command["seq_len"])
            else:
                answer = {"error": f"unknown command {command['cmd']!r}"}
        except Exception as err:  # noqa: BLE001 - reported to the parent as the peer's failure
            answer = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def hardware_limits(model_dir: str, seq_len: int) -> dict[str, Any]:
    """The machine's fp32 matmul FLOP/s on TORCH_THREADS threads, per second of wall time and per
    CPU-second: the best of torch's matmul and ONNX Runtime's MatMul (MLAS, the GEMM bei's CPU
    engine and Infinity's ONNX engine run), each on 2048^3 and on the model's own MLP shape
    (4096 tokens x hidden x intermediate), best of 7; and the model's FLOPs per token at `seq_len`:
    2 x the encoder's Linear parameters + attention scores and values."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    shapes = [(2048, 2048, 2048), (4096, config.hidden_size, config.intermediate_size)]
    measured = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        measured[f"torch {m}x{k} @ {k}x{n}"] = _best_of(lambda a=a, b=b: a @ b, 2 * m * k * n)
        measured[f"onnxruntime MatMul {m}x{k} @ {k}x{n}"] = _best_of(_ort_matmul(a.numpy(), b.numpy()), 2 * m * k * n)
    best = max(measured, key=lambda label: measured[label][0])
    model = AutoModel.from_pretrained(model_dir)
    linear = sum(sum(p.numel() for p in m.parameters()) for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * seq_len * config.hidden_size * config.num_hidden_layers  # QK^T and softmax(.)V
    return {
        "matmul_flops_per_s": measured[best][0],
        "matmul_flops_per_cpu_s": max(per_cpu for _, per_cpu in measured.values()),
        "matmul": f"{best}, fp32, {TORCH_THREADS} threads, best of 7",
        "matmul_measured": {label: {"flops_per_s": wall, "flops_per_cpu_s": cpu} for label, (wall, cpu) in measured.items()},
        "encoder_linear_params": linear,
        "flops_per_token": 2 * linear + attention,
        "flops_per_token_seq_len": seq_len,
    }


def _best_of(run: Callable[[], Any], flops: int, rounds: int = 7) -> tuple[float, float]:
    """(FLOP/s of wall time, FLOP per CPU-second), each the best of `rounds` after a warm-up."""
    run()
    wall, cpu = [], []
    for _ in range(rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return flops / min(wall), flops / max(min(cpu), 1e-9)


def _ort_matmul(a: np.ndarray, b: np.ndarray) -> Callable[[], Any]:
    """A one-MatMul ONNX Runtime session (weights as an initializer, as in an engine graph)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b, "b")],
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = TORCH_THREADS
    session = onnxruntime.InferenceSession(helper.make_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


# --- set-up --------------------------------------------------------------------------------------


def fp32_config(config_path: Path) -> Path:
    """A copy of the config pinned to the fp32 engine (`cpu_precision: fp32`, model_name + `-fp32`)."""
    import yaml

    data = yaml.safe_load(config_path.read_text())
    data["model_name"] = f"{data['model_name']}-fp32"
    data["trt_llm"]["build"]["cpu_precision"] = "fp32"
    repo = data["trt_llm"]["build"]["checkpoint_repository"]
    if repo.get("source") == "LOCAL" and not str(repo["repo"]).startswith(("package:", "/")):
        repo["repo"] = str((config_path.parent / repo["repo"]).resolve())  # the copy lives elsewhere
    path = BENCH_DIR / "configs" / f"{data['model_name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def engine_summary(manifest: Any) -> dict[str, Any]:
    """What engine `bei` ran: target, precision, and the candidates `cpu_precision: auto` timed."""
    summary = {"target": manifest.target.name, "precision": str(manifest.precision)}
    if manifest.selection:
        summary["selection"] = [c.model_dump(exclude_none=True) for c in manifest.selection]
    print(f"bench: bei's engine (the config's default build): {summary}", file=sys.stderr)
    return summary


def ensure_engine(config_path: Path) -> tuple[Path, Path]:
    """The engine directory (built when none is up to date) and the checkpoint folder."""
    from bei.checkpoint import resolve_checkpoint
    from bei.cli import _up_to_date_engine
    from bei.config import load_config
    from bei.settings import engines_dir_default

    config = load_config(config_path)
    repo = config.trt_llm.build.checkpoint_repository
    checkpoint = resolve_checkpoint(
        repo.source.value, repo.repo, revision=repo.revision, secret_name=repo.runtime_secret_name, base_dir=config_path.resolve().parent
    )
    engines_root = engines_dir_default()
    engine_dir = _up_to_date_engine(config_path, engines_root)
    if engine_dir is None:
        print(f"bench: no up-to-date engine for {config_path}: running bei build", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "bei.cli", "build", str(config_path), "--quiet"], check=True)
        engine_dir = _up_to_date_engine(config_path, engines_root)
        assert engine_dir is not None
    return engine_dir.resolve(), checkpoint.path


def setup_infinity(model_dir: Path, optimum_dir: Path, max_seq_len: int) -> None:
    """`.bench/infinity-venv` with infinity-emb (torch first, so that nothing pulls a CUDA build),
    and the model folder copy its ONNX engine reads."""
    python = INFINITY_VENV / "bin" / "python"
    env = {**os.environ, "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if not (INFINITY_VENV / "bin" / "infinity_emb").exists():
        print(f"bench: creating {INFINITY_VENV} (a few minutes)", file=sys.stderr)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(INFINITY_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True, env=env)
        subprocess.run([*pip, f"infinity-emb[torch,server,optimum]=={INFINITY_VERSION}"], check=True, env=env)
    if not (optimum_dir / "model.onnx").exists():
        print(f"bench: exporting {optimum_dir}/model.onnx with optimum", file=sys.stderr)
        staging = optimum_dir.with_name(optimum_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(model_dir, staging)
        subprocess.run(
            [
                str(INFINITY_VENV / "bin" / "optimum-cli"),
                "export",
                "onnx",
                "--model",
                str(staging),
                "--task",
                "feature-extraction",
                "--library-name",
                "transformers",
                str(staging / "export"),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        shutil.move(staging / "export" / "model.onnx", staging / "model.onnx")
        shutil.rmtree(staging / "export")
        # Infinity's ONNX engine truncates at max_position_embeddings; the exported graph keeps
        # its position table, so this only moves the truncation to where the other peers cut
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text())
        config["max_position_embeddings"] = max_seq_len
        config_file.write_text(json.dumps(config, indent=2))
        shutil.rmtree(optimum_dir, ignore_errors=True)
        staging.rename(optimum_dir)


# --- the run -------------------------------------------------------------------------------------


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "all-minilm-l6-v2.yaml",
        help="the model's bei config (default configs/all-minilm-l6-v2.yaml)",
    )
    parser.add_argument("--workloads", help=f"comma-separated, of {', '.join(WORKLOADS)} (default {FULL['workloads']})")
    parser.add_argument("--batch-sizes", help=f"client batch sizes (default {FULL['batch_sizes']})")
    parser.add_argument("--concurrency", help=f"requests in flight (default {FULL['concurrency']})")
    parser.add_argument(
        "--peers", default=",".join(DEFAULT_PEERS), help=f"comma-separated, of {', '.join(PEERS)} (default {','.join(DEFAULT_PEERS)})"
    )
    parser.add_argument(
        "--int8-config",
        type=Path,
        default=ROOT / "configs" / "all-minilm-l6-v2-int8.yaml",
        help="the bei-int8 peer's config (default configs/all-minilm-l6-v2-int8.yaml)",
    )
    parser.add_argument(
        "--bf16-config",
        type=Path,
        default=ROOT / "configs" / "all-minilm-l6-v2-bf16.yaml",
        help="the bei-bf16 peer's config (default configs/all-minilm-l6-v2-bf16.yaml)",
    )
    parser.add_argument("--requests", type=int, help="requests per cell (instead of --duration)")
    parser.add_argument("--duration", type=float, help=f"seconds per cell; requests in flight then finish (default {FULL['duration']})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a grid of ~2 minutes on an idle 2-core machine: workloads {QUICK['workloads']}, batch sizes "
        f"{QUICK['batch_sizes']}, concurrency {QUICK['concurrency']}, {QUICK['duration']:g} s per cell; "
        "explicit flags override it",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "bench.json", help="JSON results (default .bench/bench.json)")
    parser.add_argument("--plots-dir", type=Path, help="where bench-throughput.png and bench-latency.png go (default: next to --out)")
    parser.add_argument("--bei-serve-args", default="", help='extra `bei serve` flags, e.g. "--engine-threads 1"')
    parser.add_argument(
        "--setup-infinity", action="store_true", help="create .bench/infinity-venv (and the model copy its ONNX engine reads) when missing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # the run happens in the repository root: paths given relative to the caller's directory are resolved first
    args.config, args.int8_config, args.bf16_config = args.config.resolve(), args.int8_config.resolve(), args.bf16_config.resolve()
    args.out = args.out.resolve()
    args.plots_dir = args.plots_dir.resolve() if args.plots_dir else args.out.parent
    preset = QUICK if args.quick else FULL
    for key in ("workloads", "batch_sizes", "concurrency", "duration"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.batch_sizes, args.concurrency = csv_ints(args.batch_sizes), csv_ints(args.concurrency)
    args.peers = [p for p in args.peers.split(",") if p]
    for name, allowed in (("workloads", WORKLOADS), ("peers", PEERS)):
        unknown = set(getattr(args, name)) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))} (known: {', '.join(allowed)})")
    if "bei" not in args.peers:
        parser.error("--peers must include bei: every figure is a ratio to it")
    if max(args.concurrency) > MAX_CONCURRENCY:
        parser.error(f"--concurrency: at most {MAX_CONCURRENCY}, the connection pool of bei.client's httpx client")
    return args


def machine() -> dict[str, Any]:
    model = (
        next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(cells: list[Cell]) -> str:
    header = "| workload | batch | conc | peer | emb/s | tokens/s | p50 ms | p99 ms | peak RSS MiB | CPU ms/emb | x bei |"
    lines = [header, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        if c.status != "ok":
            lines.append(f"| {c.workload} | {c.batch_size} | {c.concurrency} | {c.peer} | {c.status} | | | | | | |")
            continue
        ratio = "1.00" if c.peer == "bei" else (f"{c.ratio_to_bei:.2f}" if c.ratio_to_bei is not None else "-")
        lines.append(
            f"| {c.workload} | {c.batch_size} | {c.concurrency} | {c.peer} | {fmt(c.embeddings_per_s, 1)} | "
            f"{fmt(c.tokens_per_s)} | {fmt(c.p50_ms, 1)} | {fmt(c.p99_ms, 1)} | {fmt(c.peak_rss_mib)} | "
            f"{fmt(c.cpu_ms_per_embedding, 2)} | {ratio} |"
        )
    return "\n".join(lines)


def plots(cells: list[Cell], peers: list[str], directory: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    ok = [c for c in cells if c.status == "ok"]
    workloads = list(dict.fromkeys(c.workload for c in ok))
    if not workloads:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {peer: f"C{index}" for index, peer in enumerate(PEERS)}

    def axes_for(ax: Any, ticks: list[int]) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=False):
        for peer in peers:
            sizes = sorted({c.batch_size for c in ok if c.peer == peer and c.workload == workload})
            best = [max(c.embeddings_per_s or 0 for c in ok if (c.peer, c.workload, c.batch_size) == (peer, workload, b)) for b in sizes]
            if sizes:
                ax.plot(sizes, best, marker="o", label=peer, color=colors[peer])
        ax.set(
            title=f"{workload} (~{WORKLOADS[workload]} tokens)", xlabel="client batch size", ylabel="embeddings/s (best over concurrency)"
        )
        axes_for(ax, sorted({c.batch_size for c in ok}))
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / "bench-throughput.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    sizes = sorted({c.batch_size for c in ok})
    size = 32 if 32 in sizes else sizes[0]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=False):
        for peer in peers:
            row = sorted((c.concurrency, c.p50_ms, c.p99_ms) for c in ok if (c.peer, c.workload, c.batch_size) == (peer, workload, size))
            if row:
                conc, p50, p99 = zip(*row, strict=False)
                ax.plot(conc, p50, marker="o", color=colors[peer], label=f"{peer} p50")
                ax.plot(conc, p99, marker="x", linestyle="--", color=colors[peer], label=f"{peer} p99")
        ax.set(title=f"{workload}, client batch {size}", xlabel="concurrency", ylabel="request latency (ms)")
        axes_for(ax, sorted({c.concurrency for c in ok}))
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(directory / "bench-latency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


@dataclass
class Lineup:
    """The peers that started, with what is known of every peer asked for."""

    peers: dict[str, Peer] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)

    def stop(self) -> None:
        for peer in self.peers.values():
            peer.stop()


def start_peers(names: list[str], makers: dict[str, Callable[[], Peer]], probe: list[str], lineup: Lineup) -> None:
    """Start each peer in turn and check its vectors of `probe` against sentence-transformers'."""
    reference: np.ndarray | None = None
    for name in ["sentence-transformers", *[n for n in names if n != "sentence-transformers"]]:
        if name in lineup.status:
            continue
        peer = makers[name]()
        print(f"bench: starting {name}", file=sys.stderr)
        try:
            peer.start()
            vectors = peer.embed(probe)
        except Exception as err:  # noqa: BLE001 - any failure to start is reported; the run goes on
            lineup.status[name] = f"unavailable: {err if isinstance(err, PeerUnavailable) else repr(err)}"
            peer.stop()
            continue
        if name == "sentence-transformers":
            reference = vectors
            if name not in names:  # only the reference was wanted
                peer.stop()
                continue
        lineup.peers[name], lineup.status[name], lineup.versions[name] = peer, "ok", peer.version
        if reference is not None:
            lineup.agreement[name] = cosine(vectors, reference)
            if lineup.agreement[name] < MIN_AGREEMENT.get(name, 0.999):
                print(
                    f"bench: warning: {name} agrees with sentence-transformers only to cosine {lineup.agreement[name]:.4f}", file=sys.stderr
                )
    lineup.peers = {name: lineup.peers[name] for name in PEERS if name in lineup.peers}  # bei first


def run_grid(lineup: Lineup, workloads: dict[str, Workload], args: argparse.Namespace) -> list[Cell]:
    """Every cell, each peer in turn (interleaved, so that outside load hits all peers alike)."""
    budget = Budget(args.requests, args.duration)
    cells: list[Cell] = []
    for workload in workloads.values():
        for size in args.batch_sizes:
            for conc in args.concurrency:
                for name, peer in lineup.peers.items():
                    if isinstance(peer, TorchWorker) and conc != 1:
                        continue  # in-process: no concurrency
                    cell = Cell(name, workload.name, size, conc)
                    try:
                        with ProcessMonitor(peer.pid) as usage:
                            latencies = peer.run_cell(cell, workload, budget)
                        cell.peak_rss_mib = usage.mib
                        if usage.cpu_seconds is not None and cell.embeddings:
                            cell.cpu_ms_per_embedding = usage.cpu_seconds * 1000 / cell.embeddings
                        cell.finish(latencies)
                    except Exception as err:  # noqa: BLE001 - one failed cell is reported, not fatal
                        cell.status = f"failed: {type(err).__name__}: {str(err)[:200]}"
                    cells.append(cell)
                    print(
                        f"  {workload.name:6} batch {size:3} conc {conc:2} {name:22} "
                        f"{fmt(cell.embeddings_per_s, 1):>9} emb/s  p50 {fmt(cell.p50_ms, 1):>9} ms  {cell.status}",
                        file=sys.stderr,
                    )
    bei_cells = {(c.workload, c.batch_size, c.concurrency): c for c in cells if c.peer == "bei" and c.embeddings_per_s}
    for c in cells:
        base = bei_cells.get((c.workload, c.batch_size, c.concurrency))
        if base is not None and c.embeddings_per_s is not None:
            c.ratio_to_bei = c.embeddings_per_s / (base.embeddings_per_s or 1)
    return cells


def hardware_fraction(hardware: dict[str, Any] | None, cells: list[Cell]) -> dict[str, Any] | None:
    """bei's best long-input cell as a fraction of the machine's matmul FLOP/s: per second of wall
    time, and per CPU-second (which holds better when other work shares the cores)."""
    long_cells = [c for c in cells if c.peer == "bei" and c.workload == "long" and c.tokens_per_s]
    if not hardware or "error" in hardware or not long_cells:
        return hardware
    best = max(long_cells, key=lambda c: c.tokens_per_s or 0)
    achieved = (best.tokens_per_s or 0) * hardware["flops_per_token"]
    fraction = {
        **hardware,
        "bei_best_long_cell": {"batch_size": best.batch_size, "concurrency": best.concurrency},
        "bei_achieved_flops_per_s": achieved,
        "bei_fraction_of_matmul_limit": achieved / hardware["matmul_flops_per_s"],
    }
    if best.cpu_ms_per_embedding:
        per_cpu_s = best.tokens / best.embeddings * hardware["flops_per_token"] / (best.cpu_ms_per_embedding / 1000)
        fraction["bei_flops_per_cpu_s"] = per_cpu_s
        fraction["bei_fraction_of_matmul_per_cpu_s"] = per_cpu_s / hardware["matmul_flops_per_cpu_s"]
    return fraction


def goal_ratios(cells: list[Cell], workload: str = "medium") -> dict[str, dict[str, dict[str, float]]]:
    """bei's (and bei-int8's, bei-bf16's) throughput over each other peer's, cell by cell on `workload`:
    the issue's goals are stated on medium inputs against sentence-transformers and Infinity."""
    ok = {(c.peer, c.batch_size, c.concurrency): c for c in cells if c.workload == workload and c.embeddings_per_s}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for mine in ("bei", "bei-fp32", "bei-int8", "bei-bf16"):
        for (peer, size, conc), theirs in ok.items():
            own = ok.get((mine, size, conc))
            if peer.startswith("bei") or own is None:
                continue
            key = f"{mine} / {peer}"
            ratios.setdefault(key, {})[f"batch {size}, concurrency {conc}"] = (own.embeddings_per_s or 0) / (theirs.embeddings_per_s or 1)
    return ratios


def report(result: dict[str, Any], cells: list[Cell], written: list[Path]) -> None:
    print()
    print(table(cells))
    print()
    for name, info in result["peers"].items():
        cos = info["min_cosine_vs_sentence_transformers"]
        print(
            f"{name}: {info['status']}"
            + (f", version {info['version']}" if info["version"] else "")
            + (f", min cosine vs sentence-transformers {cos:.5f}" if cos is not None else "")
        )
    for pair, by_cell in result["medium_ratios"].items():
        print(f"medium, {pair}: " + ", ".join(f"{ratio:.2f}x ({cell})" for cell, ratio in by_cell.items()))
    limit = result["hardware_limit"]
    if limit and "error" in limit:
        print(f"hardware limit: not measured: {limit['error']}")
    elif limit and "bei_fraction_of_matmul_limit" not in limit:
        print(f"hardware limit: {limit['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; bei's fraction of it needs the long workload")
    elif limit:
        print(
            f"hardware limit: {limit['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({limit['matmul']}); "
            f"model: {limit['flops_per_token'] / 1e6:.1f} MFLOP/token at {limit['flops_per_token_seq_len']} tokens; "
            f"bei on long inputs: {limit['bei_achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{limit['bei_fraction_of_matmul_limit']:.0%} of the limit"
        )
        if "bei_flops_per_cpu_s" in limit:
            print(
                f"  per CPU-second: matmul {limit['matmul_flops_per_cpu_s'] / 1e9:.1f} GFLOP, bei "
                f"{limit['bei_flops_per_cpu_s'] / 1e9:.1f} GFLOP = {limit['bei_fraction_of_matmul_per_cpu_s']:.0%}"
            )
    before, after = result["load_average_before_after"]
    cores = result["machine"]["cores"] or 1
    print(
        f"load average (1, 5, 15 min) before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
        f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}, on {cores} cores"
        + (
            ": other work shared the machine, so absolute figures are low and noisy; the ratios, measured side by side, hold better"
            if max(before[0], after[0]) > cores
            else ""
        )
    )
    print(f"results: {result['out']}" + "".join(f", {p}" for p in written))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_dtype)
        return 0
    os.chdir(ROOT)
    from bei.engine.manifest import read_manifest

    log_dir = BENCH_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    engine_dir, model_dir = ensure_engine(args.config)
    manifest = read_manifest(engine_dir)
    optimum_dir = BENCH_DIR / "infinity-models" / f"{manifest.name}-onnx"
    lineup = Lineup()
    if args.setup_infinity and any(p.startswith("infinity") for p in args.peers):
        try:
            setup_infinity(model_dir, optimum_dir, manifest.max_input_tokens)
        except (subprocess.CalledProcessError, OSError) as err:
            lineup.status.update({p: f"not installed: {err}" for p in args.peers if p.startswith("infinity")})

    workloads = {
        name: make_workload(name, WORKLOADS[name], engine_dir / "tokenizer.json", manifest.max_input_tokens) for name in args.workloads
    }
    print("bench: measuring the machine's matmul FLOP/s", file=sys.stderr)
    hardware = TorchWorker(model_dir, log_dir).hardware(manifest.max_input_tokens)  # before any server runs
    makers: dict[str, Callable[[], Peer]] = {
        "bei": lambda: BeiPeer(log_dir, engine_dir, shlex.split(args.bei_serve_args)),
        "bei-fp32": lambda: BeiPeer(log_dir, ensure_engine(fp32_config(args.config))[0], shlex.split(args.bei_serve_args), name="bei-fp32"),
        "bei-int8": lambda: BeiPeer(log_dir, ensure_engine(args.int8_config)[0], shlex.split(args.bei_serve_args), name="bei-int8"),
        "bei-bf16": lambda: BeiPeer(log_dir, ensure_engine(args.bf16_config)[0], shlex.split(args.bei_serve_args), name="bei-bf16"),
        "sentence-transformers": lambda: TorchWorker(model_dir, log_dir),
        "sentence-transformers-bf16": lambda: TorchWorker(model_dir, log_dir, dtype="bf16"),
        "infinity-torch": lambda: InfinityPeer(log_dir, "torch", model_dir),
        "infinity-optimum": lambda: InfinityPeer(log_dir, "optimum", optimum_dir),
    }
    try:
        start_peers(args.peers, makers, [w.texts[0] for w in workloads.values()], lineup)
        for name, status in lineup.status.items():
            if status != "ok":
                print(f"bench: {name}: {status}", file=sys.stderr)
        if "bei" not in lineup.peers:
            return 1
        cells = run_grid(lineup, workloads, args)
    finally:
        lineup.stop()

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "model": {"name": manifest.name, "folder": str(model_dir), "max_input_tokens": manifest.max_input_tokens},
        "bei_engine": engine_summary(manifest),
        "grid": {
            "workloads": {
                n: {"target_tokens": w.target_tokens, "mean_tokens_after_truncation": float(np.mean(w.tokens))}
                for n, w in workloads.items()
            },
            "batch_sizes": args.batch_sizes,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "duration_s": None if args.requests else args.duration,
        },
        "bei_serve_args": args.bei_serve_args,
        "peers": {
            name: {
                "status": lineup.status.get(name, "not run"),
                "version": lineup.versions.get(name),
                "min_cosine_vs_sentence_transformers": lineup.agreement.get(name),
            }
            for name in args.peers
        },
        "hardware_limit": hardware_fraction(hardware, cells),
        "medium_ratios": goal_ratios(cells),
        "cells": [asdict(c) for c in cells],
        "out": str(args.out),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    written = plots(cells, list(lineup.peers), args.plots_dir)
    report(result, cells, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
