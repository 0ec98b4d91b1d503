"""`bei serve --ray` as a command: SIGTERM drains (the requests in flight are answered, the application is deleted,
each replica stopped gracefully) and the command exits 0, where Ray's own SIGTERM handler would end it at once.

A `bei serve --ray --replicas 1` subprocess (its own local Ray, 1 replica of half a CPU) under a bounded load of
3 clients; the clients stop sending, then SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from bei.testing.inproc_server import make_and_build
from tests.servers import bei_command, bei_env

pytest.importorskip("ray.serve")

READY_S = 180.0
TEXTS = [f"text number {i} about a river and a stone" for i in range(1000)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_and_exits_0(tmp_path: Path) -> None:
    _, engine, _ = make_and_build(str(tmp_path), "tiny-drain", "bert", "rerank", {"seed": 1}, {"target": "onnxruntime"})
    port = _free_port()
    command = bei_command("serve", engine, "--ray", "--replicas", "1", "--num-cpus-per-replica", "0.5", "--engine-threads", "1")
    command += ["--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "60"]
    env = bei_env(RAY_DISABLE_USAGE_STATS="1")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"bei serve --ray not healthy: {log.read_text()[-2000:]}")

        stop = threading.Event()
        answers: list[tuple[float, float, str]] = []  # (sent, answered, status or error)

        def client() -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        status = str(http.post("/rerank", json={"query": "a river?", "texts": TEXTS}).status_code)
                    except httpx.TransportError as error:
                        status = repr(error)
                    answers.append((sent, time.monotonic(), status))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        while len(answers) < 6 and process.poll() is None:
            time.sleep(0.05)
        stop.set()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in clients:
            thread.join(120)
        code = process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    in_flight = [status for sent, answered, status in answers if sent < signalled < answered]
    assert in_flight, "no request was in flight at the SIGTERM"
    assert in_flight == ["200"] * len(in_flight), in_flight
    assert {status for _, _, status in answers} == {"200"}
    assert code == 0, log.read_text()[-2000:]
