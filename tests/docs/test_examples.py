"""Every shell and Python example of the README and the docs runs, against a real server on the tiny model.

Pages' blocks are found and run by :mod:`tests.docs.examples` (its docstring says what an example may assume).
Each page gets a fresh server, and its run blocks execute in page order, so one block may use what an earlier
one made (an uploaded adapter, a trained run). A block that fails prints its output and the page line.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.docs.examples import NORUN_REASONS, DocsWorld, all_examples, extract, make_tiny_base, pages

EXAMPLES = all_examples()
RUN_PAGES = sorted({e.page for e in EXAMPLES if e.runs})
#: Pages whose examples train or evaluate models (tens of seconds each, even on the tiny model).
SLOW_PAGES = {"docs/training.md"}


def test_every_example_is_marked_run_or_a_documented_exception():
    unmarked = [str(e) for e in EXAMPLES if e.marker is None]
    assert not unmarked, "mark each block <!-- run --> or <!-- norun: REASON -->: " + ", ".join(unmarked)
    unknown = [f"{e} ({e.reason})" for e in EXAMPLES if e.reason is not None and e.reason not in NORUN_REASONS]
    assert not unknown, f"norun reasons must be one of {sorted(NORUN_REASONS)}: {unknown}"


def test_most_examples_run():
    counts = Counter("run" if e.runs else "norun" for e in EXAMPLES)
    assert counts["run"] >= 20 and counts["norun"] <= 8, counts


def test_extract_reads_markers_and_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- run -->\n```bash\necho hi\n```\n\n<!-- norun: docker -->\n\n```python\nx = 1\n```\n"
                    "```json\n{}\n```\n```sh\nls\n```\n")
    import tests.docs.examples as ex

    old = ex.REPO
    ex.REPO = tmp_path
    try:
        found = extract(page)
    finally:
        ex.REPO = old
    assert [(e.lang, e.marker, e.code) for e in found] == [
        ("bash", "run", "echo hi\n"), ("python", "norun: docker", "x = 1\n"), ("sh", None, "ls\n")]
    assert [e.runs for e in found] == [True, False, False] and found[1].reason == "docker"


def test_pages_include_the_readme_and_docs():
    names = {str(p.name) for p in pages()}
    assert {"README.md", "getting-started.md", "concepts.md", "training.md"} <= names


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("docs-tiny-base"))


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p
                                  for p in RUN_PAGES])
def test_the_examples_of_a_page_run(page, tiny_base, tmp_path):
    world = DocsWorld(tmp_path, tiny_base)
    try:
        for ex in (e for e in EXAMPLES if e.page == page and e.runs):
            done = world.run(ex)
            assert done.returncode == 0, (
                f"{ex} failed (exit {done.returncode})\n--- example\n{ex.code}--- stdout\n{done.stdout[-3000:]}"
                f"\n--- stderr\n{done.stderr[-5000:]}")
    finally:
        world.close()
