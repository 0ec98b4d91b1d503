"""The batcher's worker (bei/scheduler/batcher.py) with a recording backend: double buffering
(the next batch is prepared while the current one runs), order of rows, and a failing batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from bei.backend import Backend, Batch
from bei.errors import EngineFailedError
from bei.scheduler.batcher import Batcher
from bei.text.tokenizer import Encoded


def encoded(n: int, first: int) -> Encoded:
    ids = list(range(first, first + n))
    return Encoded(ids=ids, type_ids=[0] * n, offsets=[(0, 0)] * n, special=[0] * n)


class RecordingBackend(Backend):
    """Row i's output is its first token id; `run` of the first batch waits until the second batch
    has been prepared, which only happens if preparation overlaps the running call."""

    name = "recording"
    input_names = ["input_ids", "attention_mask"]

    def __init__(self, fail_on: int | None = None) -> None:
        self.events: list[str] = []
        self.second_prepared = threading.Event()
        self.prepared = 0
        self.fail_on = fail_on

    def prepare(self, batch: Batch) -> object:
        self.prepared += 1
        self.events.append(f"prepare {self.prepared}")
        if self.prepared == 2:
            self.second_prepared.set()
        return batch

    def run(self, prepared: object) -> np.ndarray:
        assert isinstance(prepared, Batch)
        call = sum(e.startswith("run") for e in self.events) + 1
        self.events.append(f"run {call}")
        if call == 1:
            self.events.append("overlapped" if self.second_prepared.wait(5) else "serial")
        if call == self.fail_on:
            raise RuntimeError("device lost")
        return self.infer(prepared)

    def infer(self, batch: Batch) -> np.ndarray:
        return batch.input_ids[:, :1].astype(np.float32)


async def _submit_all(batcher: Batcher, groups: list[list[Encoded]]) -> list[object]:
    batcher.start()
    try:
        tasks = [asyncio.create_task(batcher.submit(g)) for g in groups]
        return list(await asyncio.gather(*tasks, return_exceptions=True))
    finally:
        await batcher.stop()


def make_batcher(backend: Backend) -> Batcher:
    return Batcher(backend, pad_id=0, padding_side="right", max_batch_tokens=64, max_batch_requests=2)


def test_next_batch_is_prepared_while_the_current_one_runs() -> None:
    backend = RecordingBackend()
    groups = [[encoded(3, 100 * i + 1)] for i in range(6)]  # 6 inputs, 2 per batch: 3 batches
    results = asyncio.run(_submit_all(make_batcher(backend), groups))
    assert "overlapped" in backend.events, backend.events
    assert backend.events.index("prepare 2") < backend.events.index("run 2")
    for i, result in enumerate(results):  # every request got its own row
        assert float(result.rows[0][0]) == 100 * i + 1  # type: ignore[union-attr]


def test_a_failed_batch_fails_its_requests_only() -> None:
    backend = RecordingBackend(fail_on=1)
    groups = [[encoded(3, 100 * i + 1)] for i in range(4)]
    results = asyncio.run(_submit_all(make_batcher(backend), groups))
    failed = [r for r in results if isinstance(r, EngineFailedError)]
    assert len(failed) == 2 and "device lost" in str(failed[0])
    assert sorted(float(r.rows[0][0]) for r in results if not isinstance(r, BaseException)) == [201, 301]  # type: ignore[union-attr]


@pytest.mark.parametrize("count", [1, 5])
def test_rows_come_back_in_input_order(count: int) -> None:
    backend = RecordingBackend()
    backend.second_prepared.set()  # nothing to wait for
    group = [encoded(1 + (i * 7) % 5, 10 * i + 1) for i in range(count)]
    (result,) = asyncio.run(_submit_all(make_batcher(backend), [group]))
    assert [float(r[0]) for r in result.rows] == [10 * i + 1 for i in range(count)]  # type: ignore[union-attr]


class SlowBackend(RecordingBackend):
    """Each engine call takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def run(self, prepared: object) -> np.ndarray:
        threading.Event().wait(self.seconds)
        assert isinstance(prepared, Batch)
        return self.infer(prepared)


def test_queue_time_counts_the_wait_for_the_running_batch() -> None:
    """A batch prepared while another runs is still queued until its own engine call starts: its
    requests' queue time includes the running call (x-queue-time + x-inference-time ~ total)."""
    groups = [[encoded(3, 1), encoded(3, 2)], [encoded(3, 3), encoded(3, 4)]]  # 2 batches of 2
    results = asyncio.run(_submit_all(make_batcher(SlowBackend(0.3)), groups))
    first, second = results
    assert first.inference_time >= 0.3 and second.inference_time >= 0.3  # type: ignore[union-attr]
    assert first.queue_time < 0.1, first  # type: ignore[union-attr]
    assert second.queue_time >= 0.29, second  # type: ignore[union-attr]


class PackingBackend(RecordingBackend):
    pads = False


def test_the_batcher_budgets_by_what_the_backend_computes() -> None:
    """A padding backend is budgeted by rows x longest row, a packing one by real tokens."""
    groups = [[encoded(4, 100)], [encoded(4, 200)], [encoded(4, 300)], [encoded(12, 400)]]  # 24 real tokens

    def calls(backend: RecordingBackend) -> int:
        batcher = Batcher(backend, pad_id=0, padding_side="right", max_batch_tokens=24, max_batch_requests=8)
        assert batcher.queue.padded is backend.pads
        for group in groups:  # queued before the worker starts: one decision over all four
            batcher.queue.push(len(group[0]), group)
        return len([b for b in iter(batcher.queue.next_batch, [])])

    assert calls(RecordingBackend()) == 2  # 4 x 12 = 48 padded positions > 24
    assert calls(PackingBackend()) == 1
