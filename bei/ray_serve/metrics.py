"""`/metrics` of `bei serve --ray`: bei's metrics of every replica, whichever replica answers the scrape.

Each replica publishes its figures (the families of its own registry: bei_*, process_*) to one small Ray actor,
the board, every PUBLISH_S seconds, and gets back the latest figures of the other replicas. Its /metrics then
serves its own fresh figures and the others' (at most PUBLISH_S old), every sample labelled
`replica="<Ray Serve replica id>"`: `sum without (replica) (rate(bei_requests_total[1m]))` is the whole
application's. A replica that stops publishing (killed, scaled down) drops out after STALE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

PUBLISH_S = 5.0
STALE_S = 3 * PUBLISH_S
BOARD_NAMESPACE = "bei"

Snapshot = dict[str, list[Metric]]  # replica id -> its metric families


class MetricsBoard:
    """The Ray actor that holds each replica's latest figures (one per application, detached: it outlives replicas)."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[float, list[Metric]]] = {}

    def publish(self, replica: str, families: list[Metric]) -> Snapshot:
        """Keep `replica`'s figures; the fresh figures of the others."""
        now = time.monotonic()
        self.figures[replica] = (now, families)
        self.figures = {r: (t, f) for r, (t, f) in self.figures.items() if now - t <= STALE_S}
        return {r: f for r, (_, f) in self.figures.items() if r != replica}

    def withdraw(self, replica: str) -> None:
        self.figures.pop(replica, None)


def board(app_name: str) -> Any:
    """The board of this application (created by the first replica that asks)."""
    import ray

    actor: Any = ray.remote(num_cpus=0, max_restarts=-1)(MetricsBoard)  # restarted empty: the replicas refill it within PUBLISH_S
    return actor.options(name=f"metrics-{app_name}", namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True).remote()


class ReplicasCollector(Collector):
    """This replica's families and the others' last published ones, merged per family, labelled by replica."""

    def __init__(self, own: CollectorRegistry, replica: str, others: Callable[[], Snapshot]) -> None:
        self.own, self.replica, self.others = own, replica, others

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        sources = [(self.replica, list(self.own.collect())), *sorted(self.others().items())]
        for replica, families in sources:
            for family in families:
                out = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                out.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
        yield from merged.values()


class Publisher:
    """One replica's side: publish every PUBLISH_S while the app runs; `registry` is what its /metrics serves."""

    def __init__(self, own: CollectorRegistry, replica: str, app_name: str) -> None:
        self.own, self.replica, self.app_name = own, replica, app_name
        self.others: Snapshot = {}
        self.registry = CollectorRegistry()
        self.registry.register(ReplicasCollector(own, replica, lambda: self.others))

    async def run(self) -> None:
        """Publish until cancelled, then withdraw; a board that cannot be reached only leaves the others out."""
        from ray.exceptions import RayError

        target = board(self.app_name)
        try:
            while True:
                with contextlib.suppress(RayError):  # the board unreachable: this replica's own figures stay served
                    self.others = await target.publish.remote(self.replica, list(self.own.collect()))
                await asyncio.sleep(PUBLISH_S)
        finally:
            with contextlib.suppress(RayError, TimeoutError):
                await asyncio.wait_for(target.withdraw.remote(self.replica), PUBLISH_S)
