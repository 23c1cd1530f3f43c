"""Prometheus metrics of the service, per stance.

All metrics live in one :class:`Metrics` object with its own
``CollectorRegistry`` (so tests can build several apps in one process). The
``stance`` label is the adapter name, the named blend's name (``/v1/stances``), ``"base"``,
or ``"blend"`` for every anonymous weighted blend (a request's own ``stances``), so label
cardinality is bounded by the registered adapters and named blends.
Names follow Prometheus conventions: snake_case, base units, ``_total`` for
counters. The engine's events feed it (:meth:`Metrics.observe`, :meth:`Metrics.observe_engine`) and its live
counts are read at scrape time, both wired by :meth:`Metrics.attach`: the engine knows nothing of this module. Error responses are counted by
:class:`app.api.error_metrics.ErrorMetricsMiddleware` (:meth:`Metrics.count_error`); the process's own memory and
CPU come from prometheus-client's ``ProcessCollector`` (``process_resident_memory_bytes``... on Linux). Series of a deleted adapter are dropped by
:meth:`Metrics.forget_stance`. This module only records; it does not time
anything itself except the tokens-per-second window, whose memory is a few
counters per stance (one per second of the window), not one entry per token.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.engine import (
    AdapterCacheEvent,
    AdapterLoadEvent,
    AdmittedEvent,
    EngineEvent,
    EngineStats,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    PreemptedEvent,
    RejectedEvent,
    RequestEvent,
    TokenEvent,
)


class Watchable(Protocol):
    """What :meth:`Metrics.attach` needs of an engine (:class:`app.engine.Engine`)."""

    def subscribe(self, observer: Metrics) -> None: ...

    def stats(self) -> EngineStats: ...


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

#: Shared ``stance`` labels that no adapter deletion removes (see :meth:`Metrics.forget_stance`).
SHARED_STANCES = frozenset({"base", "blend"})

_EMPTY = -(2**62)  # second index of a ring slot never written


class _Ring:
    """One stance's token counts of its last ``size`` whole seconds: slot ``k % size`` holds second ``k``."""

    __slots__ = ("counts", "seconds")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.seconds = [_EMPTY] * size


class _TokenRate(Collector):
    """``stanceserve_generation_tokens_per_second``: generated tokens per second over the last ``window_s`` seconds.

    Memory is O(``window_s``) per stance whatever the traffic: each stance keeps a
    ring of ``ceil(window_s) + 1`` counters, one per whole second (``floor(t)``), and
    :meth:`add` only increments the counter of its second. The rate at ``now`` is
    the tokens of the seconds that overlap ``(now - window_s, now]`` divided by
    ``window_s``; the oldest, partly covered second counts in proportion to its
    overlap (tokens assumed spread evenly within it), so the gauge is exact for
    steady traffic and within one second's tokens otherwise. Stances stay listed
    (at rate 0) until :meth:`forget`.

    Args:
        window_s: averaging window, in seconds (> 0).

    Raises:
        ValueError: ``window_s`` is not positive.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        self.window_s = float(window_s)
        self.size = math.ceil(self.window_s) + 1
        self._rings: dict[str, _Ring] = {}
        self._lock = threading.Lock()

    def add(self, stance: str, n: int, now: float | None = None) -> None:
        """Count ``n`` tokens generated for ``stance`` at ``now`` (``time.monotonic()`` seconds by default).

        A time older than the ring holds for that second's slot is dropped (it is out of the window).
        """
        second = math.floor(time.monotonic() if now is None else now)
        i = second % self.size
        with self._lock:
            ring = self._rings.get(stance)
            if ring is None:
                ring = self._rings[stance] = _Ring(self.size)
            held = ring.seconds[i]
            if held == second:
                ring.counts[i] += n
            elif held < second:  # the slot holds an expired second: reuse it
                ring.seconds[i] = second
                ring.counts[i] = n

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Tokens per second of every stance seen (and not forgotten), over ``(now - window_s, now]``."""
        now = time.monotonic() if now is None else now
        lo = now - self.window_s
        out = {}
        with self._lock:
            for stance, ring in self._rings.items():
                total = 0.0
                for second, count in zip(ring.seconds, ring.counts):
                    if count:
                        total += count * min(1.0, max(0.0, second + 1 - lo))
                out[stance] = total / self.window_s
        return out

    def forget(self, stance: str) -> None:
        """Drop ``stance``'s ring, so the gauge no longer lists it (no-op if unknown)."""
        with self._lock:
            self._rings.pop(stance, None)

    def stances(self) -> list[str]:
        """The stances that have a ring."""
        with self._lock:
            return list(self._rings)

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
        self.prefix_cache_tokens = Counter(
            "stanceserve_prefix_cache_tokens",
            "Prompt tokens looked up in the prefix cache at admission (result: hit = KV reused, miss = prefilled).",
            ["stance", "result"], registry=r,
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
        self.http_errors = Counter(
            "stanceserve_http_errors", "Error responses (HTTP status >= 400) by status and the body's error code.",
            ["status", "code"], registry=r,
        )
        self.constrained_requests = Counter(
            "stanceserve_constrained_requests",
            "Admitted requests under constrained decoding (kind: json, regex, choice, grammar, tools).",
            ["stance", "kind"], registry=r,
        )
        self.grammar_mask_seconds = Counter(
            "stanceserve_grammar_mask_seconds",
            "Time spent computing token masks of constrained requests, in seconds (beside the forward pass).",
            ["stance"], registry=r,
        )
        self.model_info = Info(
            "stanceserve_model", "The served base model: name, device, dtype, and whether the CPU has native bf16.",
            registry=r,
        )
        self.preemptions = Counter(
            "stanceserve_preemptions",
            "Sequences preempted because the KV cache ran out of blocks (each resumes later by recomputing its KV).",
            ["stance"], registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux)
        self.token_rate = _TokenRate(window_s)
        self._last_token_at: dict[str, float] = {}  # request id -> perf_counter of its last token, in flight only
        r.register(self.token_rate)

    def _per_stance(self) -> tuple[Histogram | Counter, ...]:
        """The labelled metrics that carry a ``stance`` label (the tokens/s gauge aside)."""
        return (self.request_latency, self.ttft, self.itl, self.prompt_tokens, self.generation_tokens, self.requests,
                self.prefix_cache_tokens, self.constrained_requests, self.grammar_mask_seconds, self.preemptions)

    def forget_stance(self, name: str, *, force: bool = False) -> None:
        """Remove every series of stance ``name`` from every per-stance metric.

        Call it when an adapter or a named blend is deleted, so ``/metrics`` stops listing it: the
        latency/TTFT/ITL histograms, the prompt/generation token counters, the
        request counter (every ``status`` of that stance) and the tokens/s gauge.
        A request still running on the adapter that finishes afterwards records a
        fresh series. Unknown names are a no-op.

        Args:
            name: the ``stance`` label (the adapter or named blend's name).
            force: also remove the shared labels ``"base"`` and ``"blend"``
                (:data:`SHARED_STANCES`); without it they are kept, since an adapter
                that happens to bear one of these names shares its series with them.
        """
        if name in SHARED_STANCES and not force:
            return
        for metric in self._per_stance():
            # partial match on the stance label: every label combination of it, read under the metric's lock
            metric.remove_by_labels({"stance": name})
        self.token_rate.forget(name)

    def observe(self, request: GenerationRequest, event: RequestEvent) -> None:
        """Record one engine event (the engine calls this for every event of every request, on its thread).

        Admitted -> prompt tokens and prefix cache hits/misses; token -> TTFT (first) or inter-token latency, generated tokens, tokens/s;
        finish -> request latency and outcome; error -> outcome ``error``; rejected -> outcome ``rejected``; preempted -> the preemption counter. Keeps one float per request in
        flight (its last token time), dropped when it ends.
        """
        label = request.stance.label
        if isinstance(event, TokenEvent):
            last = self._last_token_at.get(request.request_id)
            if last is None:
                self.ttft.labels(label).observe(event.at - request.arrival)
            else:
                self.itl.labels(label).observe(event.at - last)
            self._last_token_at[request.request_id] = event.at
            self.generation_tokens.labels(label).inc()
            self.token_rate.add(label, 1)
        elif isinstance(event, AdmittedEvent):
            self.prompt_tokens.labels(label).inc(event.prompt_tokens)
            self.prefix_cache_tokens.labels(label, "hit").inc(event.cached_tokens)
            self.prefix_cache_tokens.labels(label, "miss").inc(event.prompt_tokens - event.cached_tokens)
            grammar = request.params.grammar
            if grammar is not None:
                self.constrained_requests.labels(label, grammar.kind).inc()
        elif isinstance(event, FinishEvent):
            self._last_token_at.pop(request.request_id, None)
            if event.mask_s:
                self.grammar_mask_seconds.labels(label).inc(event.mask_s)
            self.request_latency.labels(label).observe(event.at - request.arrival)
            self.requests.labels(label, event.reason).inc()
        elif isinstance(event, ErrorEvent):
            self._last_token_at.pop(request.request_id, None)
            self.requests.labels(label, "error").inc()
        elif isinstance(event, RejectedEvent):
            self.requests.labels(label, "rejected").inc()
        elif isinstance(event, PreemptedEvent):
            self.preemptions.labels(label).inc()

    def observe_engine(self, event: EngineEvent) -> None:
        """Record one engine-wide event: adapter slot cache lookups and loads into a slot."""
        if isinstance(event, AdapterCacheEvent):
            self.adapter_cache.labels(event.result).inc()
        elif isinstance(event, AdapterLoadEvent):
            self.adapter_load.observe(event.seconds)

    def attach(self, engine: Watchable) -> None:
        """Watch ``engine``: subscribe to its events and read its live counts at scrape time (before it starts)."""
        engine.subscribe(self)
        self.bind_gauges(running=lambda: engine.stats().running, waiting=lambda: engine.stats().waiting,
                         loaded=lambda: engine.stats().adapters_loaded)

    def count_error(self, status: int, code: str) -> None:
        """Count one error response: HTTP ``status`` and its ``{"error": {"code"}}`` (bounded: the service's codes)."""
        self.http_errors.labels(str(status), code).inc()

    def bind_gauges(self, running: Callable[[], float], waiting: Callable[[], float], loaded: Callable[[], float]) -> None:
        """Make the running/waiting/loaded gauges read live values at scrape time."""
        self.requests_running.set_function(running)
        self.requests_waiting.set_function(waiting)
        self.adapters_loaded.set_function(loaded)

    def stance_summary(self) -> dict[str, dict[str, float]]:
        """Per stance label, read from the same series ``/metrics`` renders (``GET /metrics/stances``).

        ``tokens_per_second`` (the windowed gauge), and the running totals ``ttft_seconds_sum`` / ``ttft_count``
        (the TTFT histogram's), ``generation_tokens`` and ``requests`` (every outcome): a reader that polls
        gets the mean TTFT of an interval as the difference of sums over the difference of counts.
        """
        out: dict[str, dict[str, float]] = {}

        def row(stance: str) -> dict[str, float]:
            return out.setdefault(stance, {"tokens_per_second": 0.0, "ttft_seconds_sum": 0.0, "ttft_count": 0.0,
                                           "generation_tokens": 0.0, "requests": 0.0})

        reads = ((self.ttft, {"stanceserve_time_to_first_token_seconds_sum": "ttft_seconds_sum",
                              "stanceserve_time_to_first_token_seconds_count": "ttft_count"}),
                 (self.generation_tokens, {"stanceserve_generation_tokens_total": "generation_tokens"}),
                 (self.requests, {"stanceserve_requests_total": "requests"}))
        for metric, names in reads:
            for family in metric.collect():
                for s in family.samples:
                    if s.name in names:
                        row(s.labels["stance"])[names[s.name]] += s.value
        for stance, rate in self.token_rate.rates().items():
            row(stance)["tokens_per_second"] = rate
        return dict(sorted(out.items()))

    def render(self) -> bytes:
        """The text exposition format (what ``GET /metrics`` returns)."""
        return generate_latest(self.registry)
