"""The product speaks of itself only: no lab notes in the README, the docs, the code's docstrings and comments, or
the shipped adapters' READMEs.

A lab note is a phrase that only makes sense to the people who built stanceserve: a work session, an issue, a
commit id, "this box" or "this machine", a timing measured on one CPU. Numbers belong on the benchmarks page (which
states its machine, command and date) and in the experiment logs of the adapters (which state their commands).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: (name, pattern) of each kind of lab note; case-insensitive.
PATTERNS: list[tuple[str, str]] = [
    ("a work session", r"\b(this|that|earlier|previous|last|later|next|another|same) sessions?\b|\b(in|from) an? (earlier |later |previous |other )?session\b"
                       r"|\bsessions? (ago|before)\b"),
    ("an issue", r"\bthe issue\b|\bissues? ?#?\d+\b|\bissue'?s\b|#\d{1,4}\b(?![0-9a-f])"),
    ("a commit id", r"\b(at|commit|since|before|after) `?[0-9a-f]{7,40}\b`?"
                    r"|`(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,12}`"),
    ("the machine it was written on", r"\bthis (box|machine|host|cpu|laptop)\b|(?<!out of )\bthe box\b"
                                      r"|\bthis project's (machines?|cpu|box|sessions?)\b|\bshared box\b"),
    ("a timing measured on one CPU", r"\bmeasured (here|on this|on an? \d-core|on the \d-core)\b"
                                     r"|\b\d-core (amd|intel|epyc|cpu)\b"),
]
LAB_NOTE = re.compile("|".join(f"(?P<k{i}>{p})" for i, (_, p) in enumerate(PATTERNS)), re.IGNORECASE)


def scanned_files() -> list[Path]:
    """README.md, every Markdown page under docs/ (the benchmarks page too: it states its machine in a table,
    never "this machine"), the Python of app/, training/ and bench/, and the shipped adapters' READMEs."""
    files = [REPO / "README.md"]
    files += sorted((REPO / "docs").rglob("*.md"))
    files += sorted((REPO / "docs").rglob("*.py"))
    for pkg in ("app", "training", "bench"):
        files += sorted((REPO / pkg).rglob("*.py"))
        files += sorted((REPO / pkg).rglob("*.md"))
    files += sorted((REPO / "adapters").glob("*/README.md"))
    files.append(REPO / "adapters" / "README.md")
    return [f for f in files if f.is_file()]


def find_lab_notes(text: str) -> list[tuple[int, str, str]]:
    """``(line number, kind, matched text)`` of every lab note in ``text``."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in LAB_NOTE.finditer(line):
            kind = PATTERNS[int(next(k for k, v in m.groupdict().items() if v)[1:])][0]
            hits.append((n, kind, m.group(0)))
    return hits


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("as measured in an earlier session", "a work session"),
        ("the issue's 0.95x target", "an issue"),
        ("targets of issues #4 and #10", "an issue"),
        ("regenerated at 2caa907", "a commit id"),
        ("`d4ada4d` made 47.3 tok/s", "a commit id"),
        ("This shared box drifts", "the machine it was written on"),
        ("not reachable from this machine", "the machine it was written on"),
        ("measured on this CPU: 0.3 ms", "a timing measured on one CPU"),
        ("Measured on this 2-core CPU at 16 rows", "a timing measured on one CPU"),
        ("(2-core AMD EPYC CPU, SmolLM2-135M fp32)", "a timing measured on one CPU"),
        ("on this project's machines", "the machine it was written on"),
        ("Measured by `stanceserve bench` (see the benchmarks page)", None),
    ],
)
def test_the_patterns_catch_each_kind(text, kind):
    kinds = {k for _, k, _ in find_lab_notes(text)}
    assert (kind in kinds) if kind else not kinds, (text, kinds)


@pytest.mark.parametrize(
    "text",
    [
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "a session cookie",  # not one of the time words
        "HTTP 404 and #fff colours",
        "The machine's CPU flags are in the table.",
    ],
)
def test_ordinary_text_passes(text):
    assert not find_lab_notes(text)


def test_no_lab_notes_in_the_product():
    found = []
    for path in scanned_files():
        for n, kind, match in find_lab_notes(path.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{path.relative_to(REPO)}:{n}: {kind}: {match!r}")
    assert not found, "lab notes (say what the product does, not how it was built):\n" + "\n".join(found)
