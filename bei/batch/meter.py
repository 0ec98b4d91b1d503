"""Progress of a batch job on stderr: rows done of the total, rows/s and the time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Meter:
    """`add(rows)` after each part; the rate counts this run's rows only (kept parts are not computed)."""

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, enabled: bool = True, every_s: float = 1.0) -> None:
        self.total = total
        self.done = done
        self.computed = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self.started = time.perf_counter()
        self._shown = 0.0
        self._tty = self.stream.isatty()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.computed / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else None
        share = 100.0 * self.done / self.total if self.total else 100.0
        eta = _clock(left) if left is not None else "?"
        return f"{self.done}/{self.total} rows ({share:.1f}%), {rate:.1f} rows/s, ETA {eta}"

    def add(self, rows: int) -> None:
        self.done += rows
        self.computed += rows
        now = time.perf_counter()
        if self.enabled and (now - self._shown >= self.every_s or self.done >= self.total):
            self._shown = now
            print(("\r" if self._tty else "") + self.line(), end="" if self._tty else "\n", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            end = "\n" if self._tty else ""
            print(f"{end}{self.computed} rows computed in {_clock(elapsed)} ({self.rate:.1f} rows/s)", file=self.stream, flush=True)
