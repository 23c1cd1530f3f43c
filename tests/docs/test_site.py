"""The documentation site builds strictly, and its generated parts cover the code: every error code has its
remedy, every route is on the HTTP API page, and the README's benchmark headline matches the benchmarks page."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _hook():
    spec = importlib.util.spec_from_file_location("docs_hook_generated", REPO / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_is_strict_and_clean(tmp_path):
    """Broken links, pages missing from the nav, bad mkdocstrings references and docstring warnings fail it."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-5000:]
    api = (site / "http-api.html").read_text(encoding="utf-8")
    assert "POST /v1/chat/completions" in api and "adapter_in_use" in api  # the generated blocks were expanded
    assert "<!-- generated:" not in api
    assert (site / "reference" / "engine.html").read_text(encoding="utf-8").count("resolve_stance") >= 1
    assert (site / "blend-curves" / "curious-uncertainty.png").is_file()  # the linked outputs are published


def test_every_error_code_is_explained():
    rows = _hook().error_codes()
    import app.errors as errors

    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.StanceServeError)}
    assert codes | set(errors._HTTP_CODES.values()) == {r["code"] for r in rows}
    missing = [r["code"] for r in rows if not r["advice"] or not r["meaning"]]
    assert not missing, f"add what to do about these codes to ADVICE in docs/hooks/generated.py: {missing}"


def test_every_route_is_on_the_http_api_page():
    from app.main import create_app

    spec = create_app().openapi()
    text = _hook().render_routes(spec)
    for path, ops in spec["paths"].items():
        for method in ops:
            assert f"### `{method.upper()} {path}`" in text


def test_unknown_generated_block_fails_the_build():
    class Page:
        class file:
            src_uri = "x.md"

    with pytest.raises(ValueError, match="unknown generated block"):
        _hook().on_page_markdown("<!-- generated: nope -->\n", Page, None, None)


def test_readme_headline_is_the_benchmarks_page():
    from bench.report import HEADLINE_BEGIN, HEADLINE_END, headline

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(HEADLINE_BEGIN) + len(HEADLINE_BEGIN): readme.index(HEADLINE_END)].strip()
    assert block == headline((REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")), (
        "rerun `stanceserve bench ... --report docs/benchmarks.md` from the repository root")


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 160
    for needed in ("make serve", "make test", "from openai import OpenAI", '"stances"', "docs/benchmarks.md"):
        assert needed in readme, needed
