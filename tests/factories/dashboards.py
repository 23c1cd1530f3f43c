"""The Grafana dashboard's queries, read from its JSON model (no Grafana needed)."""

from __future__ import annotations


def dashboard_queries(model: dict) -> list[tuple[str, str]]:
    """``(panel title, PromQL expression)`` of every query target of every panel."""
    return [(p["title"], t["expr"]) for p in model["panels"] for t in p.get("targets", [])]
