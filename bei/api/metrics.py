"""Counters and histograms served at /metrics in Prometheus' text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bei.telemetry import SIZE_BUCKETS, TIME_BUCKETS, Histogram

@dataclass
class Metrics:
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

    def render(
        self,
        *,
        batches: int,
        queue_depth: int,
        in_flight: int,
        batch_sizes: Histogram,
        batch_tokens: Histogram,
        tokenization_time: Histogram,
    ) -> str:
        lines = ["# HELP bei_requests_total Requests answered, by route and status.", "# TYPE bei_requests_total counter"]
        for (path, status), count in sorted(self.requests.items()):
            lines.append(f'bei_requests_total{{route="{path}",status="{status}"}} {count}')
        lines += [
            "# TYPE bei_tokens_total counter",
            f"bei_tokens_total {self.tokens}",
            "# TYPE bei_batches_total counter",
            f"bei_batches_total {batches}",
            "# TYPE bei_queue_depth gauge",
            f"bei_queue_depth {queue_depth}",
            "# TYPE bei_requests_in_flight gauge",
            f"bei_requests_in_flight {in_flight}",
        ]
        lines += self.queue_time.render("bei_queue_seconds", "Time a request's inputs waited for the engine.")
        lines += self.inference_time.render("bei_inference_seconds", "Engine time of a request's batches.")
        lines += self.request_time.render("bei_request_seconds", "Whole request time.")
        lines += self.request_tokens.render("bei_request_tokens", "Tokens per request.")
        lines += tokenization_time.render("bei_tokenization_seconds", "Tokenization time per request.")
        lines += batch_sizes.render("bei_batch_size", "Inputs per engine call.")
        lines += batch_tokens.render("bei_batch_tokens", "Padded tokens per engine call.")
        return "\n".join(lines) + "\n"
