"""Counters served at /metrics in Prometheus' text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    inputs: int = 0
    tokens: int = 0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0

    def observe(self, path: str, status: int, tokens: int, queue: float, inference: float) -> None:
        self.requests[(path, status)] += 1
        self.tokens += tokens
        self.queue_seconds += queue
        self.inference_seconds += inference

    def render(self, *, batches: int, queue_depth: int, in_flight: int) -> str:
        lines = [
            "# HELP bei_requests_total Requests answered, by route and status.",
            "# TYPE bei_requests_total counter",
        ]
        for (path, status), count in sorted(self.requests.items()):
            lines.append(f'bei_requests_total{{route="{path}",status="{status}"}} {count}')
        lines += [
            "# TYPE bei_tokens_total counter",
            f"bei_tokens_total {self.tokens}",
            "# TYPE bei_queue_seconds_total counter",
            f"bei_queue_seconds_total {self.queue_seconds:.6f}",
            "# TYPE bei_inference_seconds_total counter",
            f"bei_inference_seconds_total {self.inference_seconds:.6f}",
            "# TYPE bei_batches_total counter",
            f"bei_batches_total {batches}",
            "# TYPE bei_queue_depth gauge",
            f"bei_queue_depth {queue_depth}",
            "# TYPE bei_requests_in_flight gauge",
            f"bei_requests_in_flight {in_flight}",
        ]
        return "\n".join(lines) + "\n"
