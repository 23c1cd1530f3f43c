"""Prometheus metrics of the service, per stance.

All metrics live in one :class:`Metrics` object with its own
``CollectorRegistry`` (so tests can build several apps in one process). The
``stance`` label is the adapter name, ``"base"``, or ``"blend"`` for every
weighted blend, so label cardinality is bounded by the registered adapters.
Names follow Prometheus conventions: snake_case, base units, ``_total`` for
counters. This module only records; it does not time anything itself except
the tokens-per-second window.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class _TokenRate(Collector):
    """``stanceserve_generation_tokens_per_second``: generated tokens per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def add(self, stance: str, n: int, now: float | None = None) -> None:
        with self._lock:
            self._events[stance].append((time.monotonic() if now is None else now, n))

    def rates(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        out = {}
        with self._lock:
            for stance, q in self._events.items():
                while q and q[0][0] < now - self.window_s:
                    q.popleft()
                out[stance] = sum(n for _, n in q) / self.window_s
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "stanceserve_generation_tokens_per_second",
            f"Generated tokens per second over the last {self.window_s:g} s, per stance.",
            labels=["stance"],
        )
        for stance, rate in sorted(self.rates().items()):
            g.add_metric([stance], rate)
        yield g


class Metrics:
    """Every Prometheus metric of one server instance.

    Args:
        window_s: window of the tokens-per-second gauge, in seconds.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        r = self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "stanceserve_request_latency_seconds", "End-to-end request latency in the engine, in seconds.",
            ["stance"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "stanceserve_time_to_first_token_seconds", "Time from arrival to the first generated token, in seconds.",
            ["stance"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "stanceserve_inter_token_latency_seconds", "Time between consecutive generated tokens, in seconds.",
            ["stance"], buckets=ITL_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "stanceserve_prompt_tokens", "Prompt tokens prefilled.", ["stance"], registry=r
        )
        self.generation_tokens = Counter(
            "stanceserve_generation_tokens", "Tokens generated.", ["stance"], registry=r
        )
        self.requests = Counter(
            "stanceserve_requests", "Finished requests by outcome (status: stop, length, cancelled, error, rejected).",
            ["stance", "status"], registry=r,
        )
        self.requests_running = Gauge(
            "stanceserve_requests_running", "Sequences in the running batch.", registry=r
        )
        self.requests_waiting = Gauge(
            "stanceserve_requests_waiting", "Requests queued, not yet admitted.", registry=r
        )
        self.adapter_load = Histogram(
            "stanceserve_adapter_load_seconds", "Time to copy an adapter into a device slot, in seconds.",
            buckets=LOAD_BUCKETS, registry=r,
        )
        self.adapters_loaded = Gauge(
            "stanceserve_adapters_loaded", "Adapters resident in device slots.", registry=r
        )
        self.adapters_registered = Gauge(
            "stanceserve_adapters_registered", "Adapters registered in the store.", registry=r
        )
        self.adapter_cache = Counter(
            "stanceserve_adapter_cache", "Adapter slot cache lookups (result: hit, miss, eviction).",
            ["result"], registry=r,
        )
        self.token_rate = _TokenRate(window_s)
        r.register(self.token_rate)

    def bind_gauges(self, running: Callable[[], float], waiting: Callable[[], float], loaded: Callable[[], float]) -> None:
        """Make the running/waiting/loaded gauges read live values at scrape time."""
        self.requests_running.set_function(running)
        self.requests_waiting.set_function(waiting)
        self.adapters_loaded.set_function(loaded)

    def render(self) -> bytes:
        """The text exposition format (what ``GET /metrics`` returns)."""
        return generate_latest(self.registry)
