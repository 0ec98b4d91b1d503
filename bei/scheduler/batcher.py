"""The batcher: one worker that drains the token-budget queue into engine calls.

Requests submit encoded inputs and await their rows; the worker runs the backend on a thread
(ONNX Runtime and torch release the GIL), so inputs that arrive during a call join a later one.
Double buffering: while a batch runs, the next one is taken from the queue (when it holds work),
padded and prepared (`Backend.prepare`: packing, copies to the GPU) on a second thread, so the
engine starts it as soon as the current call returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bei.backend import Backend, Batch
from bei.errors import EngineFailedError, NotReadyError, client_safe
from bei.scheduler.queue import TokenBudgetQueue
from bei.telemetry import SIZE_BUCKETS, Histogram
from bei.text.tokenizer import Encoded

log = logging.getLogger("bei")


@dataclass
class _Pending:
    encoded: Encoded
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    queue_time: float = 0.0
    inference_time: float = 0.0


@dataclass(frozen=True)
class Result:
    """Rows of one request, in its input order, with the time they spent queued and computed."""

    rows: list[np.ndarray]
    queue_time: float
    inference_time: float


class Batcher:
    def __init__(
        self,
        backend: Backend,
        *,
        pad_id: int,
        padding_side: str,
        max_batch_tokens: int,
        max_batch_requests: int,
        per_token_output: bool = False,
    ) -> None:
        self.backend = backend
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.per_token_output = per_token_output
        self.queue: TokenBudgetQueue[_Pending] = TokenBudgetQueue(max_batch_tokens, max_batch_requests, padded=backend.pads)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bei-engine")
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bei-prepare")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches_run = 0
        self.dropped = 0  # inputs whose request went away (client disconnected) before their engine call
        self.batch_sizes = Histogram(SIZE_BUCKETS)
        self.batch_tokens = Histogram(SIZE_BUCKETS)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bei-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        self._preparer.shutdown(wait=True)

    async def submit(self, encoded: Sequence[Encoded]) -> Result:
        if self._closing:
            raise NotReadyError("the server is shutting down")
        loop = asyncio.get_running_loop()
        pending = [_Pending(enc, loop.create_future()) for enc in encoded]
        for item in pending:
            self.queue.push(len(item.encoded), item)
        self._wakeup.set()
        try:
            rows = list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:  # the request went away: its inputs leave the queue now, in one pass
            self.dropped += self.queue.discard(pending)
            raise
        return Result(
            rows=rows,
            queue_time=max(p.queue_time for p in pending),
            inference_time=max(p.inference_time for p in pending),
        )

    def _take(self) -> _Taken | None:
        """The next batch of live requests, its preparation started on the preparer thread."""
        taken = self.queue.next_batch()
        group = [item for item in taken if not item.future.done()]
        self.dropped += len(taken) - len(group)
        if not group:  # every request of this batch went away (client disconnected)
            return None
        encoded = [p.encoded for p in group]

        def prepare() -> tuple[Batch, object]:
            batch = Batch.pad(encoded, self.pad_id, self.padding_side)
            return batch, self.backend.prepare(batch)

        future = asyncio.get_running_loop().run_in_executor(self._preparer, prepare)
        return _Taken(group, future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        upcoming: _Taken | None = None
        while True:
            if upcoming is None:
                if not len(self.queue):
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                upcoming = self._take()
                if upcoming is None:
                    continue
            taken, upcoming = upcoming, None
            group = taken.group
            started = time.perf_counter()
            for item in group:  # queued until its engine call starts: a prepared batch waits for the running one
                item.queue_time = started - item.enqueued
            try:
                batch, prepared = await taken.prepared
                if all(item.future.done() for item in group):  # prepared while the last call ran; its requests went away since
                    self.dropped += len(group)
                    continue
                running = loop.run_in_executor(self._executor, self.backend.run, prepared)
                if len(self.queue):  # prepare the next batch while this one runs
                    upcoming = self._take()
                output = await running
            except Exception as err:  # a failed call fails its requests, not the server
                # the client reads the error's type and first line, never paths: the log has it all
                log.error("the engine failed on a batch of %d inputs", len(group), exc_info=err)
                failure = EngineFailedError(f"the engine failed on a batch of {len(group)} inputs: {client_safe(err)}")
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(failure)
                continue
            elapsed = time.perf_counter() - started
            self.batches_run += 1
            self.batch_sizes.observe(len(group))
            self.batch_tokens.observe(batch.tokens)
            for row, item in enumerate(group):
                item.inference_time = elapsed
                if not item.future.done():  # the request may have been cancelled meanwhile
                    value = batch.row_tokens(output, row) if self.per_token_output else output[row]
                    item.future.set_result(value)


@dataclass
class _Taken:
    group: list[_Pending]
    prepared: asyncio.Future[tuple[Batch, object]]
