"""Every replica's metrics on one scrape target, labelled by replica (no Ray needed)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics
from app.ray_serve.metrics_merge import MetricsBoard, snapshot


def samples(text: str, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
    }


def test_replicas_are_merged_into_one_exposition_with_a_replica_label():
    a, b = Metrics(), Metrics()
    a.requests.labels("calm", "stop").inc(3)
    b.requests.labels("calm", "stop").inc()
    b.requests.labels("bold", "length").inc(2)
    board = MetricsBoard(ttl_s=10)
    board.put("r1", snapshot(a.registry))
    board.put("r2", snapshot(b.registry))
    text = board.render().decode()
    assert text.count("# TYPE stanceserve_requests_total counter") == 1
    got = samples(text, "stanceserve_requests_total")
    assert got == {
        (("replica", "r1"), ("stance", "calm"), ("status", "stop")): 3.0,
        (("replica", "r2"), ("stance", "calm"), ("status", "stop")): 1.0,
        (("replica", "r2"), ("stance", "bold"), ("status", "length")): 2.0,
    }
    # unlabelled gauges get one series per replica
    assert set(samples(text, "stanceserve_requests_running")) == {(("replica", "r1"),), (("replica", "r2"),)}


def test_a_replica_that_stops_pushing_is_dropped_after_the_ttl():
    board = MetricsBoard(ttl_s=5)
    board.put("old", snapshot(Metrics().registry), now=0.0)
    board.put("new", snapshot(Metrics().registry), now=4.0)
    assert board.replicas(now=4.5) == ["new", "old"]
    assert board.replicas(now=6.0) == ["new"]


def test_a_later_push_replaces_the_replicas_snapshot():
    m = Metrics()
    board = MetricsBoard(ttl_s=60)
    m.requests.labels("calm", "stop").inc()
    board.put("r1", snapshot(m.registry))
    m.requests.labels("calm", "stop").inc()
    board.put("r1", snapshot(m.registry))
    assert samples(board.render().decode(), "stanceserve_requests_total") == {
        (("replica", "r1"), ("stance", "calm"), ("status", "stop")): 2.0
    }
