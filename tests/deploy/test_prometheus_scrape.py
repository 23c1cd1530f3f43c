"""A real Prometheus (Debian's binary) scraping a real server: the metrics answer the PromQL the dashboard runs.

The server is ``python -m tests.server`` (the tiny Llama) with three adapters and two device slots (so the
slot cache hits, misses and evicts); Prometheus scrapes it every second on loopback. The test sends known
traffic (``N`` requests for each of the base model, three adapters and a blend), provokes a 429 (a burst
against a one-deep queue) and 4xx answers, waits for two scrapes after Prometheus has the final counts, then
through Prometheus' HTTP API checks:

* ``sum by (stance) (increase(stanceserve_generation_tokens_total[5m]))`` against the tokens received per
  stance, within one scrape's worth (the largest increase of that counter between two scrapes: ``increase``
  misses what the counter held at its first scrape and extrapolates by at most half an interval);
* a ``histogram_quantile`` of TTFT per stance is finite;
* every PromQL expression in deploy/grafana/dashboards/stanceserve.json returns data (``$__rate_interval`` as
  ``5m``, ``$stance`` as ``.*``), and the stance variable lists every stance.

Also ``promtool check config`` on deploy/prometheus.yml and on the test's own config, and ``promtool check
metrics`` on the server's ``/metrics``. Skipped only when the binaries are missing: ``make prometheus``
installs them (``.ci/run`` does).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time

import httpx
import pytest

from tests.factories import BASE_MODEL, REPO, chat_body, free_port, metric, preexec, stop_process, write_peft_adapter
from tests.factories.dashboards import dashboard_queries
from tests.server import start_server

pytestmark = pytest.mark.slow

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus/promtool binaries are not installed: run `make prometheus` (.ci/run does)",
)

ADAPTERS = ("calm", "bold", "warm")
N = 4  # requests per stance
SCRAPE_S = 1.0
BLEND = {"calm": 0.6, "bold": 0.4}


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


class Prom:
    """A Prometheus HTTP API client (instant queries at a given time)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = httpx.get(f"{self.base}/api/v1/query", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def by(self, expr: str, label: str, at: float | None = None) -> dict[str, float]:
        """An instant vector as ``{value of label: float}``."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr, at)}

    def last_scrape(self) -> float:
        (s,) = self.query('timestamp(up{job="stanceserve"})')
        return float(s["value"][1])


@pytest.fixture
def prometheus_for(tmp_path):
    """Start Prometheus on loopback scraping ``target`` (host:port) every second; yields a :class:`Prom`."""
    procs = []

    def start(target: str) -> Prom:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S:g}s\n  evaluation_interval: {SCRAPE_S:g}s\n"
            "scrape_configs:\n  - job_name: stanceserve\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: [\"{target}\"]\n"
        )
        checked = _promtool("check", "config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec(),
        )
        procs.append((proc, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    return Prom(base)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready in 30 s: " + (tmp_path / "prometheus.log").read_text()[-3000:])

    yield start
    for proc, log in procs:
        stop_process(proc)
        log.close()


def _label(body: dict) -> str:
    """The ``stance`` label the server's metrics give a request body."""
    if "stances" in body:
        return "blend"
    return "base" if body["model"] == BASE_MODEL else body["model"]


async def _burst(base: str, body: dict, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))


def test_compose_scrape_config_is_valid():
    if PROMTOOL is None:
        pytest.skip("promtool is not installed: run `make prometheus`")
    done = _promtool("check", "config", str(REPO / "deploy" / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_prometheus
def test_real_scrapes_answer_the_dashboard(tmp_path, prometheus_for):
    store = tmp_path / "server" / "store"
    for i, name in enumerate(ADAPTERS):
        write_peft_adapter(store / name, "llama", rank=4, seed=20 + i, scale=0.5)
    env = {"STANCESERVE_MAX_LORAS": "2", "STANCESERVE_MAX_BATCH_SIZE": "2", "STANCESERVE_MAX_WAITING": "1"}
    with start_server(tmp_path / "server", env=env) as server:
        prom = prometheus_for(server.base.removeprefix("http://"))
        deadline = time.monotonic() + 30
        while not prom.query('up{job="stanceserve"} == 1'):  # scraping has begun: the traffic below is seen grow
            assert time.monotonic() < deadline, "prometheus never scraped the server"
            time.sleep(0.2)
        received: dict[str, int] = {}

        def count(body: dict, r: httpx.Response) -> None:
            if r.status_code == 200:
                label = _label(body)
                received[label] = received.get(label, 0) + r.json()["usage"]["completion_tokens"]

        bodies = [chat_body(BASE_MODEL, max_tokens=8)]
        bodies += [chat_body(name, f"Story {k}:", max_tokens=6 + k) for k, name in enumerate(ADAPTERS)]
        bodies.append(chat_body(BASE_MODEL, "A blend says", max_tokens=8, stances=BLEND))
        with httpx.Client(base_url=server.base, timeout=60) as client:
            for _ in range(N):  # one round per scrape interval, so each stance's counter grows over N scrapes
                t0 = time.monotonic()
                for body in bodies:
                    r = client.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    count(body, r)
                time.sleep(max(0.0, SCRAPE_S - (time.monotonic() - t0)) + 0.1)
            assert client.post("/v1/chat/completions", json=chat_body("no-such-stance")).status_code == 404
            assert client.post("/v1/chat/completions", json=chat_body(BASE_MODEL, max_tokens=0)).status_code == 422
            statuses: list[int] = []
            burst = chat_body("bold", "Queue", max_tokens=48)
            for _ in range(5):  # a burst against a one-deep queue: some get 429
                responses = asyncio.run(_burst(server.base, burst, 12))
                for r in responses:
                    count(burst, r)
                statuses += [r.status_code for r in responses]
                if 429 in statuses:
                    break
            assert 429 in statuses and set(statuses) <= {200, 429}, statuses
            exposition = client.get("/metrics").text

        # the server's own counters are the tokens the clients received
        served = {s: metric(exposition, "stanceserve_generation_tokens_total", stance=s) for s in received}
        assert served == {s: float(n) for s, n in received.items()}
        assert set(received) == {"base", "blend", *ADAPTERS}
        checked = _promtool("check", "metrics", stdin=exposition)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # Prometheus has the final counts, then two more scrapes
        deadline = time.monotonic() + 30
        while prom.by("sum by (stance) (stanceserve_generation_tokens_total)", "stance") != served:
            assert time.monotonic() < deadline, prom.by("sum by (stance) (stanceserve_generation_tokens_total)", "stance")
            time.sleep(0.2)
        first = prom.last_scrape()
        while prom.last_scrape() < first + 2 * SCRAPE_S - 0.1:
            assert time.monotonic() < deadline + 10, "no new scrapes"
            time.sleep(0.2)
        at = prom.last_scrape()

        # tokens per stance, within one scrape's worth
        increase = prom.by("sum by (stance) (increase(stanceserve_generation_tokens_total[5m]))", "stance", at)
        for stance, tokens in received.items():
            (series,) = prom.query(f'stanceserve_generation_tokens_total{{stance="{stance}"}}[5m]', at)
            values = [0.0] + [float(v) for _, v in series["values"]]
            one_scrape = max(b - a for a, b in zip(values, values[1:]))
            assert one_scrape < tokens, (stance, values)  # the traffic spanned several scrapes
            assert abs(increase[stance] - tokens) <= one_scrape, (stance, increase[stance], tokens, one_scrape)

        # TTFT quantiles are finite for every stance
        ttft = prom.by("histogram_quantile(0.99, sum by (stance, le) "
                       "(rate(stanceserve_time_to_first_token_seconds_bucket[5m])))", "stance", at)
        assert set(ttft) == set(received)
        assert all(math.isfinite(v) and v > 0 for v in ttft.values()), ttft

        # every query of the dashboard returns data, and its panels show what was provoked
        model = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "stanceserve.json").read_text())
        empty = []
        for title, expr in dashboard_queries(model):
            promql = expr.replace("$__rate_interval", "5m").replace("$stance", ".*")
            if not prom.query(promql, at):
                empty.append(f"{title}: {expr}")
        assert empty == [], "dashboard queries nothing fills:\n" + "\n".join(empty)
        r = httpx.get(f"{prom.base}/api/v1/label/stance/values",
                      params={"match[]": "stanceserve_generation_tokens_total"}, timeout=10)
        assert set(r.json()["data"]) == set(received)  # the stance variable's choices
        cache = prom.by("sum by (result) (increase(stanceserve_adapter_cache_total[5m]))", "result", at)
        assert set(cache) == {"hit", "miss", "eviction"} and all(v > 0 for v in cache.values()), cache
        errors = prom.by('sum by (code) (stanceserve_http_errors_total)', "code", at)
        assert {"adapter_not_found", "invalid_request", "queue_full"} <= set(errors), errors
        rejected = prom.by('sum by (stance) (stanceserve_requests_total{status="rejected"})', "stance", at)
        assert rejected == {"bold": float(statuses.count(429))}
