"""/metrics of `bei serve --ray` without Ray (bei/ray_serve/metrics.py): the board keeps each replica's latest
figures and forgets a replica that stopped publishing; a replica's /metrics merges its own figures and the
others' into one exposition that Prometheus parses, every sample labelled by replica. The Ray side (replicas
publishing through a real board actor) is in tests/test_ray_serve.py."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bei.api.metrics import Metrics, registry_for
from bei.api.state import AppState
from bei.ray_serve import metrics as replica_metrics
from bei.ray_serve.metrics import STALE_S, MetricsBoard, Publisher
from bei.settings import ServeSettings


def _registry(requests: int) -> CollectorRegistry:
    metrics = Metrics()
    for _ in range(requests):
        metrics.observe("/embed", 200, tokens=5, queue=0.001, inference=0.002, total=0.004)
    state = AppState(ServeSettings(), {})
    return registry_for(metrics, state.engine_figures)


def test_the_board_keeps_the_latest_figures_of_live_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(replica_metrics.time, "monotonic", lambda: clock[0])
    board = MetricsBoard()
    a, b = list(_registry(1).collect()), list(_registry(2).collect())
    assert board.publish("a", a) == {}
    assert board.publish("b", b) == {"a": a}
    clock[0] += STALE_S / 2
    assert board.publish("a", b) == {"b": b}  # a's latest figures replace its earlier ones
    clock[0] += STALE_S / 2 + 1
    assert board.publish("a", a) == {}  # b stopped publishing: gone
    board.withdraw("a")
    assert board.publish("c", a) == {}


def test_a_replica_serves_every_replicas_figures_labelled() -> None:
    own = _registry(3)
    publisher = Publisher(own, "r1", "bei")
    publisher.others = {"r2": list(_registry(4).collect())}
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(publisher.registry).decode())}
    requests = {s.labels["replica"]: s.value for s in families["bei_requests"].samples if s.name == "bei_requests_total"}
    assert requests == {"r1": 3, "r2": 4}
    buckets = [s for s in families["bei_request_seconds"].samples if s.name == "bei_request_seconds_count"]
    assert sorted((s.labels["replica"], s.value) for s in buckets) == [("r1", 3), ("r2", 4)]
    assert {s.labels["replica"] for f in families.values() for s in f.samples} == {"r1", "r2"}
