"""The engine sits below the app: nothing in ``app/engine/`` imports the app's upper floors.

Imports are read with :mod:`ast` (module level, inside functions, and under ``TYPE_CHECKING`` alike), so a
lazy import cannot hide an arrow that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "app" / "engine"
#: modules of the app above the engine: its metrics, the stance catalog, the HTTP API, start-up and dependencies
UPPER = ("app.metrics", "app.catalog", "app.api", "app.main", "app.deps")


def imported(source: str, package: str) -> set[str]:
    """Every module ``source`` imports (``from x import y`` gives ``x`` and ``x.y``), relative ones resolved."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def upward(modules: set[str]) -> list[str]:
    """The modules of ``modules`` that are, or lie inside, one of :data:`UPPER`."""
    return sorted(m for m in modules if any(m == u or m.startswith(u + ".") for u in UPPER))


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from app.metrics import Metrics", ["app.metrics", "app.metrics.Metrics"]),
        ("def f():\n    import app.api.routes", ["app.api.routes"]),
        ("from app import catalog", ["app.catalog"]),
        ("from ... import deps", ["app.deps"]),
        ("from app.engine.request import Stance\nfrom app.errors import InternalError", []),
        ("from app.metricsx import y", []),
    ],
)
def test_the_check_sees_every_form_of_import(source, bad):
    assert upward(imported(source, "app.engine.sub")) == bad


def test_engine_imports_nothing_from_the_app_upper_floors():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) > 10
    arrows = {}
    for path in files:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        bad = upward(imported(path.read_text(), package))
        if bad:
            arrows[str(path.relative_to(ROOT))] = bad
    assert arrows == {}
