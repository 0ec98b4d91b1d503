#!/usr/bin/env python
"""HTTP/1.1 throughput of `bei serve` (uvicorn + httptools, the default) against `bei serve --http2`
(hypercorn: HTTP/1.1 and h2c on one port), on small embeds, so the faster stays the default.

    python scripts/bench_http.py                                  # a tiny random BERT built first
    python scripts/bench_http.py --engine engines/all-minilm-l6-v2 --concurrency 8,32 --duration 10

Both servers run at once on 127.0.0.1 (only one is sent requests at a time). Each cell (server,
concurrency) starts with a warm-up, then sends one-sentence `POST /embed` requests
for `--duration` seconds over `concurrency` keep-alive HTTP/1.1 connections from a minimal asyncio
client (raw sockets, one request in flight per connection), so that the client's own cost stays small
beside the servers'. Cells are interleaved (each concurrency runs on one server, then the other) over
`--rounds` rounds, so other load on the machine hits both alike; the table gives requests/s and p50 / p99
latency per cell, the best round of each, and the ratio hypercorn / uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"uvicorn": [], "hypercorn": ["--http2"]}
BODY = b'{"inputs":"The quick brown fox jumps over the lazy dog."}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(engine: Path, flags: list[str], threads: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "bei.cli", "serve", str(engine), "--port", str(port), "--log-level", "warning", *flags]
    command += ["--engine-threads", str(threads)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"bei serve {' '.join(flags)} exited with {process.returncode}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"bei serve {' '.join(flags)} not healthy after 120 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def one_connection(port: int, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST /embed HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
        + BODY
    )
    try:
        while time.monotonic() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"unexpected answer: {head[:200]!r}")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def cell(port: int, concurrency: int, duration: float) -> tuple[float, float, float]:
    await asyncio.gather(*(one_connection(port, time.monotonic() + 1.0, []) for _ in range(concurrency)))  # warm-up
    latencies: list[float] = []
    started = time.monotonic()
    await asyncio.gather(*(one_connection(port, started + duration, latencies) for _ in range(concurrency)))
    took = time.monotonic() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / took, statistics.median(latencies) * 1000, p99 * 1000


def tiny_engine(root: Path) -> Path:
    """A tiny random BERT embedder built in `root` (needs the `build` extra): the HTTP layer, not the
    model, is then most of each request's cost."""
    sys.path.insert(0, str(ROOT))
    from bei.testing.inproc_server import make_and_build

    _, engine_dir, _ = make_and_build(str(root), "tiny-http-bench", "bert", "embed", {"pooling": "mean"}, {})
    return Path(engine_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=None, help="engine directory to serve (default: a tiny random BERT built here)")
    parser.add_argument("--concurrency", default="8,32", help="connections, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best of each cell is kept)")
    parser.add_argument("--engine-threads", type=int, default=1, help="threads of one engine call")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        engine = args.engine or tiny_engine(Path(scratch))
        best: dict[tuple[str, int], tuple[float, float, float]] = {}
        running = {name: start(engine, flags, args.engine_threads) for name, flags in SERVERS.items()}  # both up; one loaded at a time
        try:
            for round_ in range(args.rounds):
                for concurrency in levels:
                    for name, (_, port) in running.items():
                        result = asyncio.run(cell(port, concurrency, args.duration))
                        print(f"round {round_ + 1} {name:9s} c={concurrency:<3d} {result[0]:8.1f} req/s", file=sys.stderr)
                        if (name, concurrency) not in best or result[0] > best[(name, concurrency)][0]:
                            best[(name, concurrency)] = result
        finally:
            for process, _ in running.values():
                stop(process)
    print(f"engine {engine.name}, one-sentence POST /embed over HTTP/1.1 keep-alive, best of {args.rounds} rounds")
    print(f"{'server':10s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs uvicorn':>10s}")
    for concurrency in levels:
        base = best[("uvicorn", concurrency)][0]
        for name in SERVERS:
            rate, p50, p99 = best[(name, concurrency)]
            print(f"{name:10s} {concurrency:4d} {rate:8.1f} {p50:8.2f} {p99:8.2f} {rate / base:10.2f}")


if __name__ == "__main__":
    main()
