"""Every replica's Prometheus metrics on one scrape target, each series labelled ``replica=<id>``.

A replica takes a :func:`snapshot` of its registry (plain tuples Ray can pickle) every
``Settings.metrics_push_interval_s`` and pushes it to the hub; the hub keeps the latest one per replica in a
:class:`MetricsBoard` and the ingress's ``/metrics`` renders them merged: one ``# HELP``/``# TYPE`` per family,
the samples of every replica with a ``replica`` label added (the label Ray Serve's own metrics use). So the
scraped values are at most one push interval old, and PromQL aggregates replicas with ``sum without
(replica)``. A replica that stops pushing (killed, scaled down) is dropped after ``ttl_s``; its counters then
vanish, which Prometheus handles as the end of those series.

Exemplars and native histograms are not carried (the service records neither). No Ray imports here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: One metric family as plain data: (name, documentation, type, unit, [(sample name, labels, value, timestamp)]).
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float, Any]]]

#: The label added to every series.
REPLICA_LABEL = "replica"


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """Every family ``registry`` collects now, as plain data."""
    return [
        (m.name, m.documentation, m.type, m.unit, [(s.name, dict(s.labels), float(s.value), s.timestamp) for s in m.samples])
        for m in registry.collect()
    ]


class MetricsBoard(Collector):
    """The latest snapshot of each replica, collected as merged families (thread-safe).

    Args:
        ttl_s: a replica's snapshot older than this many seconds is dropped.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = float(ttl_s)
        self._latest: dict[str, tuple[float, list[Family]]] = {}
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def put(self, replica: str, families: list[Family], now: float | None = None) -> None:
        """Keep ``families`` as replica ``replica``'s current metrics."""
        with self._lock:
            self._latest[replica] = (time.monotonic() if now is None else now, families)

    def replicas(self, now: float | None = None) -> list[str]:
        """The replicas whose snapshot is fresh, sorted."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for r in [r for r, (t, _) in self._latest.items() if now - t > self.ttl_s]:
                del self._latest[r]
            return sorted(self._latest)

    def collect(self):  # noqa: ANN201 (prometheus_client's Collector protocol)
        merged: dict[str, Metric] = {}
        fresh = set(self.replicas())
        with self._lock:
            latest = {r: fams for r, (_, fams) in self._latest.items() if r in fresh}
        for replica in sorted(latest):
            for name, doc, kind, unit, samples in latest[replica]:
                family = merged.get(name)
                if family is None:
                    family = merged[name] = Metric(name, doc, kind, unit)
                for sample_name, labels, value, timestamp in samples:
                    family.add_sample(sample_name, {**labels, REPLICA_LABEL: replica}, value, timestamp)
        yield from merged.values()

    def render(self) -> bytes:
        """The Prometheus text exposition of every fresh replica's metrics."""
        return generate_latest(self._registry)
