"""Metrics: the tokens/s gauge keeps O(window) memory and the right rate; forget_stance drops a stance's series;
attach records an engine's events and reads its live counts."""

from __future__ import annotations

import tracemalloc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.engine.observe import EngineStats
from app.metrics import Metrics, _TokenRate


def series_stances(metrics: Metrics) -> dict[str, set[str]]:
    """Metric family name -> the ``stance`` labels it exposes in ``render()`` (``*_created`` families aside)."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        if fam.name.endswith("_created"):
            continue
        for sample in fam.samples:
            if "stance" in sample.labels:
                out.setdefault(fam.name, set()).add(sample.labels["stance"])
    return out


def ring_entries(rate: _TokenRate) -> int:
    """Every slot the rate tracker holds, over all stances."""
    return sum(len(r.counts) + len(r.seconds) for r in rate._rings.values())


def test_token_rate_memory_bounded_without_scrapes():
    rate = _TokenRate(window_s=10.0)
    # 20,000 tokens over ~2,000 simulated seconds for 3 stances, never scraped
    tracemalloc.start()
    try:
        for i in range(20_000):
            rate.add(("calm", "bold", "base")[i % 3], 1, now=1000.0 + i * 0.1)
        _, peak = tracemalloc.get_traced_memory()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the old deque of (time, n) per token held ~88 B/token (~1.7 MB here); the rings are a few hundred bytes each
    assert current < 16_000, current
    assert peak < 64_000, peak
    # 3 stances x (ceil(10) + 1) slots x (count, second): 66 entries, whatever the token count
    assert ring_entries(rate) == 3 * 11 * 2


def test_token_rate_memory_does_not_grow_with_tokens():
    rate = _TokenRate(window_s=10.0)
    for i in range(1_000):
        rate.add("calm", 1, now=i * 0.01)
    before = ring_entries(rate)
    for i in range(1_000, 20_000):
        rate.add("calm", 1, now=i * 0.01)
    assert ring_entries(rate) == before


def test_token_rate_values_and_expiry():
    rate = _TokenRate(window_s=10.0)
    for i in range(50):  # 50 tokens over 100.0 .. 109.8 s
        rate.add("calm", 1, now=100.0 + i * 0.2)
    rate.add("bold", 20, now=109.5)
    r = rate.rates(now=110.0)
    assert r["calm"] == pytest.approx(5.0)
    assert r["bold"] == pytest.approx(2.0)
    # half of second 100 (5 tokens) has left the window: 45 + 2.5 tokens
    assert rate.rates(now=110.5)["calm"] == pytest.approx(4.75)
    # all expired; the stance stays listed at 0
    r = rate.rates(now=121.0)
    assert r == {"calm": 0.0, "bold": 0.0}
    # a slot reused for a new second starts from zero, not from the expired count
    rate.add("calm", 3, now=121.2)
    assert rate.rates(now=121.5)["calm"] == pytest.approx(0.3)


def test_token_rate_drops_stale_add_into_reused_slot():
    rate = _TokenRate(window_s=2.0)  # 3 slots
    rate.add("calm", 7, now=10.0)
    rate.add("calm", 1, now=7.0)  # same slot (7 % 3 == 10 % 3), older second: dropped, count kept
    assert rate.rates(now=10.5)["calm"] == pytest.approx(3.5)


def test_token_rate_rejects_bad_window():
    with pytest.raises(ValueError):
        _TokenRate(window_s=0)


def test_token_rate_gauge_in_render():
    m = Metrics(window_s=10.0)
    m.token_rate.add("calm", 10)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    (sample,) = fams["stanceserve_generation_tokens_per_second"].samples
    assert sample.labels == {"stance": "calm"}
    assert sample.value == pytest.approx(1.0)


def populate(m: Metrics, stance: str) -> None:
    m.request_latency.labels(stance).observe(0.5)
    m.ttft.labels(stance).observe(0.05)
    m.itl.labels(stance).observe(0.01)
    m.prompt_tokens.labels(stance).inc(12)
    m.generation_tokens.labels(stance).inc(8)
    m.requests.labels(stance, "stop").inc()
    m.requests.labels(stance, "length").inc()
    m.requests.labels(stance, "error").inc()
    m.token_rate.add(stance, 8)


PER_STANCE = {
    "stanceserve_request_latency_seconds",
    "stanceserve_time_to_first_token_seconds",
    "stanceserve_inter_token_latency_seconds",
    "stanceserve_prompt_tokens",
    "stanceserve_generation_tokens",
    "stanceserve_requests",
    "stanceserve_generation_tokens_per_second",
}


def test_forget_stance_removes_only_that_stance():
    m = Metrics()
    for s in ("calm", "bold", "base", "blend"):
        populate(m, s)
    before = series_stances(m)
    assert set(before) == PER_STANCE
    assert all(v == {"calm", "bold", "base", "blend"} for v in before.values())

    m.forget_stance("calm")
    after = series_stances(m)
    assert set(after) == PER_STANCE
    for name, stances in after.items():
        assert stances == {"bold", "base", "blend"}, name
    assert 'stance="calm"' not in m.render().decode()
    # the others keep their values
    assert m.requests.labels("bold", "stop")._value.get() == 1
    m.forget_stance("no-such-adapter")  # no-op
    assert series_stances(m) == after


def test_forget_stance_keeps_shared_labels_unless_forced():
    m = Metrics()
    for s in ("base", "blend"):
        populate(m, s)
    m.forget_stance("base")
    m.forget_stance("blend")
    assert all(v == {"base", "blend"} for v in series_stances(m).values())
    m.forget_stance("blend", force=True)
    assert all(v == {"base"} for v in series_stances(m).values())


def test_forgotten_stance_records_again():
    m = Metrics()
    populate(m, "calm")
    m.forget_stance("calm")
    m.requests.labels("calm", "stop").inc()
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    samples = [s for s in fams["stanceserve_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in samples] == [({"stance": "calm", "status": "stop"}, 1.0)]


class _Watched:
    """The two things :meth:`Metrics.attach` needs of an engine."""

    def __init__(self):
        self.observers = []
        self.now = EngineStats(running=2, waiting=3, adapters_loaded=1, preemptions=4)

    def subscribe(self, observer):
        self.observers.append(observer)

    def stats(self):
        return self.now


def test_attach_records_the_engine_events_and_reads_its_stats():
    from app.engine.observe import AdapterCacheEvent, AdapterLoadEvent
    from app.engine.request import GenerationRequest, PreemptedEvent, RejectedEvent, Stance
    from app.engine.sampling import SamplingParams

    m, eng = Metrics(), _Watched()
    m.attach(eng)
    assert eng.observers == [m]
    req = GenerationRequest(prompt_ids=[1], params=SamplingParams(), stance=Stance.base(), sink=lambda ev: None)
    m.observe(req, RejectedEvent())
    m.observe(req, PreemptedEvent(40))
    m.observe(req, PreemptedEvent(41))
    m.observe_engine(AdapterCacheEvent("miss"))
    m.observe_engine(AdapterCacheEvent("miss"))
    m.observe_engine(AdapterLoadEvent("a1", 0.02))
    text = m.render().decode()
    assert 'stanceserve_requests_total{stance="base",status="rejected"} 1.0' in text
    assert 'stanceserve_adapter_cache_total{result="miss"} 2.0' in text
    assert "stanceserve_adapter_load_seconds_count 1.0" in text
    assert "stanceserve_requests_running 2.0" in text
    assert "stanceserve_requests_waiting 3.0" in text
    assert "stanceserve_adapters_loaded 1.0" in text
    assert 'stanceserve_preemptions_total{stance="base"} 2.0' in text
