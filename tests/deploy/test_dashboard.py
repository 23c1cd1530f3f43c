"""The Grafana dashboard: the checked-in JSON is what deploy/grafana/dashboard.py builds, and it shows what it must.

Whether each query returns data from a real scrape is tests/deploy/test_prometheus_scrape.py; here, without
Prometheus, every metric a query names must be one the server exposes (a typo is a panel nothing fills).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from app.metrics import Metrics
from tests.factories import REPO
from tests.factories.dashboards import dashboard_queries

GRAFANA = REPO / "deploy" / "grafana"


def load_generator():
    """deploy/grafana/dashboard.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("stanceserve_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> dict:
    return json.loads((GRAFANA / "dashboards" / "stanceserve.json").read_text())


def test_checked_in_json_is_what_the_generator_builds():
    gen = load_generator()
    assert (GRAFANA / "dashboards" / "stanceserve.json").read_text() == gen.render(), "run `make dashboard`"
    assert gen.main(["--check"]) == 0


def test_panels_show_what_the_issue_asks_for(model):
    queries = dashboard_queries(model)
    by_title: dict[str, list[str]] = {}
    for title, expr in queries:
        by_title.setdefault(title, []).append(expr)

    def has(title_part: str, *needles: str) -> None:
        exprs = [e for t, es in by_title.items() if title_part.lower() in t.lower() for e in es]
        assert exprs, f"no panel titled like {title_part!r}"
        for needle in needles:
            assert any(needle in e for e in exprs), f"{title_part!r}: no query with {needle!r}"

    for title, metric in (("first token", "time_to_first_token"), ("inter-token", "inter_token_latency")):
        for q in ("0.5", "0.95", "0.99"):
            has(title, f"histogram_quantile({q}, sum by (stance, le) (rate(stanceserve_{metric}_seconds_bucket")
    has("tokens/s", "sum by (stance) (rate(stanceserve_generation_tokens_total",
        "sum(rate(stanceserve_generation_tokens_total")
    has("running", "stanceserve_requests_running", "stanceserve_requests_waiting")
    has("429", 'stanceserve_requests_total{status="rejected"')
    has("slot cache", "sum by (result) (rate(stanceserve_adapter_cache_total")  # hit, miss, eviction
    has("load time", "stanceserve_adapter_load_seconds_bucket")
    has("error", "sum by (status, code) (rate(stanceserve_http_errors_total")
    has("memory", "process_resident_memory_bytes")

    ids = [p["id"] for p in model["panels"]]
    assert len(set(ids)) == len(ids)
    names = [v["name"] for v in model["templating"]["list"]]
    assert names == ["datasource", "stance"]
    for p in model["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


_FUNCTIONS = {"histogram_quantile", "sum", "by", "rate", "increase", "le", "stance", "result", "status", "code",
              "instance", "label_values"}


def test_every_metric_a_query_names_is_exposed_by_the_server(model):
    m = Metrics()
    m.count_error(404, "adapter_not_found")
    exposed = set()
    for family in m.registry.collect():
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
    exposed |= {n + suffix for n in list(exposed) for suffix in ("_bucket", "_sum", "_count", "_total")}
    exprs = [e for _, e in dashboard_queries(model)]
    exprs.append(next(v["query"] for v in model["templating"]["list"] if v["name"] == "stance"))
    for expr in exprs:
        no_strings = re.sub(r'"[^"]*"', "", expr)
        for word in re.findall(r"[a-z_][a-z0-9_]*", no_strings.replace("$__rate_interval", "")):
            if word not in _FUNCTIONS:
                assert word in exposed, f"{word!r} in {expr!r} is not a metric the server exposes"
