"""Counters and histograms served at /metrics, exposed through prometheus-client.

Each AppState gets its own CollectorRegistry (never the library's global one: one process may
build many apps, and several engines may be served by one app). The registry holds a custom
collector that reads bei's figures at scrape time (the request counters and histograms kept here,
and the workers' histograms summed over the served engines), plus the library's process, platform
and gc collectors. Names, labels, types and buckets are those of the hand-written exposition this
replaced, so dashboards keep working; text format, escaping and content type are the library's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bei.telemetry import SIZE_BUCKETS, TIME_BUCKETS, Histogram


@dataclass
class Metrics:
    """What the request path records (the event loop is its only writer)."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    tokens: int = 0
    queue_time: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS))
    request_time: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS))
    request_tokens: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))

    def observe(self, path: str, status: int, tokens: int, queue: float, inference: float, total: float = 0.0) -> None:
        self.requests[(path, status)] += 1
        if status == 200:
            self.tokens += tokens
            self.queue_time.observe(queue)
            self.inference_time.observe(inference)
            self.request_time.observe(total)
            self.request_tokens.observe(tokens)


@dataclass(frozen=True)
class EngineFigures:
    """The workers' figures at scrape time, summed over the engines that are loaded."""

    batches: int
    dropped: int
    queue_depth: int
    in_flight: int
    batch_sizes: Histogram
    batch_tokens: Histogram
    tokenization_time: Histogram


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    counts, total, count = histogram.snapshot()
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(histogram.buckets, counts, strict=False):  # counts[-1] is past the last bound: +Inf
        running += n
        buckets.append((str(bound), running))  # le="1", le="0.001": the label values dashboards already hold
    buckets.append(("+Inf", count))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total)


class BeiCollector(Collector):
    """Yields bei_* families from the live figures each time the registry is collected."""

    def __init__(self, metrics: Metrics, engines: Callable[[], EngineFigures]) -> None:
        self.metrics = metrics
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        m, e = self.metrics, self.engines()
        requests = CounterMetricFamily("bei_requests", "Requests answered, by route and status.", labels=["route", "status"])
        for (path, status), count in sorted(m.requests.items()):
            requests.add_metric([path, str(status)], count)
        yield requests
        yield CounterMetricFamily("bei_tokens", "Tokens of the requests answered with 200.", value=m.tokens)
        yield CounterMetricFamily("bei_batches", "Engine calls run.", value=e.batches)
        yield CounterMetricFamily(
            "bei_dropped_inputs", "Inputs dropped before their engine call because their request went away.", value=e.dropped
        )
        yield GaugeMetricFamily("bei_queue_depth", "Inputs waiting in the engines' queues.", value=e.queue_depth)
        yield GaugeMetricFamily("bei_requests_in_flight", "Requests being answered.", value=e.in_flight)
        yield _histogram("bei_queue_seconds", "Time a request's inputs waited for the engine.", m.queue_time)
        yield _histogram("bei_inference_seconds", "Engine time of a request's batches.", m.inference_time)
        yield _histogram("bei_request_seconds", "Whole request time.", m.request_time)
        yield _histogram("bei_request_tokens", "Tokens per request.", m.request_tokens)
        yield _histogram("bei_tokenization_seconds", "Tokenization time per request.", e.tokenization_time)
        yield _histogram("bei_batch_size", "Inputs per engine call.", e.batch_sizes)
        yield _histogram("bei_batch_tokens", "Padded tokens per engine call.", e.batch_tokens)


def registry_for(metrics: Metrics, engines: Callable[[], EngineFigures]) -> CollectorRegistry:
    """A registry of its own for one app: bei's collector and the library's process collectors."""
    registry = CollectorRegistry()
    registry.register(BeiCollector(metrics, engines))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
