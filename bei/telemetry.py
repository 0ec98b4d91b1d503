"""Histograms that the workers fill; bei/api/metrics.py hands them to prometheus-client at /metrics."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


@dataclass
class Histogram:
    """Per-bucket counts (the last one past every bound), their sum and count. Thread-safe: the
    tokenizer threads observe concurrently. A plain holder, not a prometheus_client metric, so that
    several engines' histograms can be merged into one series at scrape time."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value
            self.count += 1

    def snapshot(self) -> tuple[list[int], float, int]:
        """(counts, total, count) read together, so the buckets always add up to the count."""
        with self._lock:
            return list(self.counts), self.total, self.count

    def merged(self, other: Histogram) -> Histogram:
        out = Histogram(self.buckets)
        (mine, my_total, my_count), (theirs, their_total, their_count) = self.snapshot(), other.snapshot()
        out.counts = [a + b for a, b in zip(mine, theirs, strict=True)]
        out.total, out.count = my_total + their_total, my_count + their_count
        return out

    @staticmethod
    def combined(histograms: list[Histogram], buckets: tuple[float, ...]) -> Histogram:
        """One histogram of several (the engines a process serves); empty when there are none."""
        total = Histogram(buckets)
        for histogram in histograms:
            total = total.merged(histogram)
        return total
