"""The stanceserve Grafana dashboard, built with grafana-foundation-sdk and written as the JSON Grafana provisions.

    python deploy/grafana/dashboard.py            # rewrites deploy/grafana/dashboards/stanceserve.json
    python deploy/grafana/dashboard.py --check    # exit 1 if the checked-in JSON is not what this builds

(``make dashboard`` runs the first.) The JSON is checked in, so Grafana (compose) needs nothing from Python;
``tests/deploy/test_dashboard.py`` checks that it is up to date, and ``tests/deploy/test_prometheus_scrape.py``
runs every PromQL expression in it against a real Prometheus scraping a real server, so a panel nothing fills
fails a test. Metric names are those of :mod:`app.metrics` (and :mod:`app.api.error_metrics`).

Panels: per-stance TTFT and inter-token latency p50/p95/p99 and request latency; tokens/s per stance and in
total; running/waiting requests, queue rejections (429) and finished requests by outcome; adapter slot cache
hits/misses/evictions, adapters resident/registered and adapter load time; error responses by status and code;
process memory (RSS) and CPU. Variables: the Prometheus data source and the stances shown (multi, all = ``.*``).

This script only builds JSON; it does not talk to Grafana or Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh

#: Where Grafana's file provider (deploy/grafana/provisioning/dashboards) finds the dashboard.
OUT = Path(__file__).resolve().parent / "dashboards" / "stanceserve.json"
UID = "stanceserve"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The stance filter every per-stance query carries (the ``stance`` variable; "All" is ``.*``).
STANCE = 'stance=~"$stance"'
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


def _quantiles(metric: str, by: str = "stance", selector: str = STANCE) -> list[tuple[str, str]]:
    """p50/p95/p99 of histogram ``metric`` (its ``_bucket`` series) per ``by``, as (expr, legend) pairs."""
    out = []
    for q in QUANTILES:
        group = f"{by}, le" if by else "le"
        series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
        expr = f"histogram_quantile({q}, sum by ({group}) (rate({series}[{RATE}])))"
        legend = f"{{{{{by}}}}} p{round(q * 100)}" if by else f"p{round(q * 100)}"
        out.append((expr, legend))
    return out


def _panel(title: str, unit: str, targets: list[tuple[str, str]], description: str, w: int = 12) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .min(0)
        .height(8)
        .span(w)
        .legend(VizLegendOptions().display_mode(LegendDisplayMode.TABLE).placement(LegendPlacement.BOTTOM)
                .show_legend(True).calcs(["lastNotNull", "max"]))
    )
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(
            prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).range()
        )
    return panel


def build() -> dashboard.Dashboard:
    """The dashboard (grafana-foundation-sdk builder)."""
    stance_var = (
        dashboard.QueryVariable("stance")
        .label("stance")
        .datasource(DS)
        .query("label_values(stanceserve_generation_tokens_total, stance)")
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    d = (
        dashboard.Dashboard("stanceserve")
        .uid(UID)
        .description("One base model, LoRA stances and blends per request: latency, throughput, queue, adapters, "
                     "errors, memory. Built by deploy/grafana/dashboard.py.")
        .tags(["stanceserve", "llm", "lora"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .with_variable(dashboard.DatasourceVariable("datasource").label("data source").type("prometheus"))
        .with_variable(stance_var)
    )
    d = d.with_row(dashboard.Row("Latency per stance"))
    d = d.with_panel(_panel(
        "Time to first token", "s", _quantiles("stanceserve_time_to_first_token_seconds"),
        "Arrival to first generated token (TTFT), p50/p95/p99 per stance (blends share the stance 'blend').",
    ))
    d = d.with_panel(_panel(
        "Inter-token latency", "s", _quantiles("stanceserve_inter_token_latency_seconds"),
        "Gap between consecutive generated tokens, p50/p95/p99 per stance.",
    ))
    d = d.with_panel(_panel(
        "Request latency", "s", _quantiles("stanceserve_request_latency_seconds"),
        "Arrival to last token, p50/p95/p99 per stance.", w=24,
    ))
    d = d.with_row(dashboard.Row("Throughput and queue"))
    d = d.with_panel(_panel(
        "Generated tokens/s", "tps",
        [(f"sum by (stance) (rate(stanceserve_generation_tokens_total{{{STANCE}}}[{RATE}]))", "{{stance}}"),
         (f"sum(rate(stanceserve_generation_tokens_total[{RATE}]))", "total")],
        "Generated tokens per second, per stance and in total (all stances, whatever the stance filter).",
    ))
    d = d.with_panel(_panel(
        "Prompt tokens/s", "tps",
        [(f"sum by (stance) (rate(stanceserve_prompt_tokens_total{{{STANCE}}}[{RATE}]))", "{{stance}}")],
        "Prompt tokens prefilled per second, per stance.",
    ))
    d = d.with_panel(_panel(
        "Running and waiting requests", "short",
        [("sum(stanceserve_requests_running)", "running"), ("sum(stanceserve_requests_waiting)", "waiting")],
        "Sequences in the running batch and requests queued for admission.",
    ))
    d = d.with_panel(_panel(
        "Queue rejections (429)", "reqps",
        [(f"sum by (stance) (rate(stanceserve_requests_total{{status=\"rejected\", {STANCE}}}[{RATE}]))",
          "{{stance}}")],
        "Requests refused with 429 queue_full because the waiting queue was full (STANCESERVE_MAX_WAITING).",
    ))
    d = d.with_panel(_panel(
        "Finished requests by outcome", "reqps",
        [(f"sum by (status) (rate(stanceserve_requests_total{{{STANCE}}}[{RATE}]))", "{{status}}")],
        "stop, length, cancelled, error, rejected, per second.", w=24,
    ))
    d = d.with_row(dashboard.Row("Adapters"))
    d = d.with_panel(_panel(
        "Adapter slot cache", "ops",
        [(f"sum by (result) (rate(stanceserve_adapter_cache_total[{RATE}]))", "{{result}}")],
        "Device slot lookups per second: hit (already resident), miss (copied in), eviction (LRU slot reused).",
        w=8,
    ))
    d = d.with_panel(_panel(
        "Adapter load time", "s",
        _quantiles("stanceserve_adapter_load_seconds", by="", selector="")
        + [(f"sum(rate(stanceserve_adapter_load_seconds_sum[{RATE}])) / "
            f"sum(rate(stanceserve_adapter_load_seconds_count[{RATE}]))", "mean")],
        "Time to copy an adapter into a device slot (a slot cache miss), p50/p95/p99 and mean.", w=8,
    ))
    d = d.with_panel(_panel(
        "Adapters resident and registered", "short",
        [("sum(stanceserve_adapters_loaded)", "in device slots"), ("sum(stanceserve_adapters_registered)", "registered")],
        "Adapters in device slots (STANCESERVE_MAX_LORAS) and in the store.", w=8,
    ))
    d = d.with_row(dashboard.Row("Errors and process"))
    d = d.with_panel(_panel(
        "Error responses by code", "reqps",
        [(f"sum by (status, code) (rate(stanceserve_http_errors_total[{RATE}]))", "{{status}} {{code}}")],
        "HTTP error responses per second by status and error code (4xx: the request; 5xx: the server). A request "
        "that fails inside the engine after its stream started shows as 'error' under finished requests.",
    ))
    d = d.with_panel(_panel(
        "Process memory", "bytes",
        [("sum by (instance) (process_resident_memory_bytes)", "RSS {{instance}}")],
        "Resident memory of each server process (CPU RAM; GPU memory is not included).", w=6,
    ))
    d = d.with_panel(_panel(
        "Process CPU", "percentunit",
        [(f"sum by (instance) (rate(process_cpu_seconds_total[{RATE}]))", "{{instance}}")],
        "CPU seconds per second of each server process (1 = one core busy).", w=6,
    ))
    return d


def render() -> str:
    """The dashboard JSON, as checked in (sorted keys, 2-space indent, trailing newline)."""
    model = json.loads(JSONEncoder(sort_keys=True).encode(build().build()))
    for i, panel in enumerate(model["panels"], start=1):  # unique ids in layout order (Grafana keys panel state by id)
        panel["id"] = i
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in JSON is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE: run make dashboard'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
