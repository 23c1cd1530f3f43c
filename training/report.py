"""Markdown evaluation report of one stance adapter against its base model.

:func:`write_eval_report` writes what an evaluation found: the setup, a summary table of
the stance scores of base vs adapter answers to the same probes (from
:func:`training.scoring.summarize`), how the scores work, and side-by-side examples.
:func:`fraction_different` is the share of probes where the adapter changed the answer.

This module only formats: it does not generate answers or compute scores (see
:mod:`training.scoring`), and it does not judge whether an adapter is good.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


#: A few marker phrases per stance, quoted in the report (the full lists are in training/scoring.py).
_EXAMPLE_MARKERS = {
    "curious-uncertainty": '"I wonder", "I\'m not sure", "What do you think?"',
    "confident-expertise": '"The answer is", "Specifically", "In short"',
    "engaged-difficulty": '"The tricky part", "This is hard because", "First, ... Then, ..."',
}


def fraction_different(base_answers: Sequence[str], adapter_answers: Sequence[str]) -> float:
    """Fraction (0..1) of probes whose adapter answer differs from the base answer.

    Answers are compared after stripping leading and trailing whitespace; any other
    difference (case, inner spaces) counts.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(base_answers) != len(adapter_answers):
        raise ValueError(f"{len(base_answers)} base answers but {len(adapter_answers)} adapter answers")
    if not base_answers:
        raise ValueError("no answers to compare")
    diff = sum(b.strip() != a.strip() for b, a in zip(base_answers, adapter_answers, strict=True))
    return diff / len(base_answers)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return str(x)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.0f}%"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fenced(text: str) -> str:
    """``text`` in a fenced block whose fence is longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _summary_rows(name: str, summary: dict) -> list[str]:
    return [
        f"| {name}: base mean | {_num(summary.get('base_mean'))} |",
        f"| {name}: base median | {_num(summary.get('base_median'))} |",
        f"| {name}: base p90 | {_num(summary.get('base_p90'))} |",
        f"| {name}: adapter mean | {_num(summary.get('adapter_mean'))} |",
        f"| {name}: adapter median | {_num(summary.get('adapter_median'))} |",
        f"| {name}: adapter answers above base p90 | {_pct(summary.get('adapter_above_base_p90'))} |",
        f"| {name}: separated (adapter mean > base p90) | {_num(summary.get('separated'))} |",
        *_reference_rows(name, summary.get("reference")),
    ]


def _reference_rows(name: str, ref: dict | None) -> list[str]:
    if not ref:
        return []
    return [
        f"| {name}: reference answers mean ({ref.get('n')} written in the stance) | {_num(ref.get('mean'))} |",
        f"| {name}: reference answers above base p90 | {_pct(ref.get('above_base_p90'))} |",
    ]


def _side(side: dict | None) -> str:
    if not side:
        return "not run"
    return f"{side.get('device', 'unknown')}, {side.get('dtype', 'unknown')}"


def runtime_lines(runtime: dict | None) -> list[str]:
    """Markdown list items stating where each side of an evaluation ran (device, dtype), so a reader compares
    like with like; ``runtime`` is :func:`training.evaluate.runtime_of` (None: both ``unknown``)."""
    runtime = runtime or {}
    gen = runtime.get("generation") or {}
    where = gen.get("where", "unknown")
    where = "this process" if where == "local" else f"the server at {where}" if where != "unknown" else "unknown"
    return [f"- Answers generated in {where}: {_side(gen) if gen else 'unknown, unknown'} (device, dtype)",
            f"- Likelihood scored in this process: {_side(runtime.get('scoring'))}"]


def write_eval_report(
    path: Path,
    *,
    adapter: str,
    base_model: str,
    probes: list[str],
    base_answers: list[str],
    adapter_answers: list[str],
    stance: str,
    marker: dict,
    likelihood: dict | None,
    per_answer: list[dict],
    examples: int = 8,
    runtime: dict | None = None,
) -> Path:
    """Write the Markdown evaluation report of ``adapter`` to ``path``.

    Args:
        path: the ``.md`` file to write (parent folders are created; overwritten).
        adapter: adapter name or folder, as shown in the report.
        base_model: base model id or path.
        probes: the user prompts, one per answer; both answer lists were generated with
            greedy decoding (the report says so).
        base_answers: the base model's answers.
        adapter_answers: the adapter's answers.
        stance: the stance the adapter was trained for.
        marker: :func:`training.scoring.summarize` of the marker scores (base, adapter).
        likelihood: the same for the likelihood scorer, or None when it was not run.
        per_answer: one dict per probe with any of ``base_marker``, ``adapter_marker``
            (floats), ``base_hits``, ``adapter_hits`` (lists of str, from
            :func:`training.scoring.marker_hits`), ``base_likelihood``,
            ``adapter_likelihood`` (floats); missing keys show as ``n/a``.
        examples: how many probes to show side by side (the first ``examples``, in order).
        runtime: :func:`training.evaluate.runtime_of`: device and dtype of both sides (shown in the setup).

    Returns:
        ``path``.

    Raises:
        ValueError: if ``probes``, the answer lists and ``per_answer`` differ in length, or are empty.
    """
    n = len(probes)
    if not (n == len(base_answers) == len(adapter_answers) == len(per_answer)):
        raise ValueError(
            f"lengths differ: {n} probes, {len(base_answers)} base answers, "
            f"{len(adapter_answers)} adapter answers, {len(per_answer)} per-answer rows"
        )
    if n == 0:
        raise ValueError("no probes")
    frac = fraction_different(base_answers, adapter_answers)

    lines = [
        f"# Stance evaluation: `{adapter}`",
        "",
        "## Setup",
        "",
        f"- Base model: `{base_model}`",
        f"- Adapter: `{adapter}` (stance `{stance}`)",
        f"- Probes: {n}, answered by the base model and by base + adapter",
        "- Decoding: greedy (deterministic), same prompts and settings for both",
        *runtime_lines(runtime),
        "",
        "## Summary",
        "",
        "| measure | value |",
        "|---|---|",
        f"| answers that differ from base | {_pct(frac)} ({round(frac * n)}/{n}) |",
        *_summary_rows("marker score", marker),
    ]
    if likelihood is not None:
        lines += _summary_rows("likelihood score", likelihood)
    how = (
        f"The **marker score** counts phrases typical of `{stance}` (for example "
        f"{_EXAMPLE_MARKERS.get(stance, 'see training/scoring.py')}) minus phrases of the opposite stance, per "
        "100 words (floor -10). It is lexical: it ignores meaning and is easy to game. "
    )
    if likelihood is not None:
        how += (
            "The **likelihood score** is, under the base model without adapter, the mean log-probability "
            "per answer token given a system prompt describing the stance minus the same given a neutral "
            "system prompt (nats per token); it is biased by answer length and fluency, and a small base "
            "model's sense of a stance is weak. "
        )
    how += (
        "Scores are relative: read them as base vs adapter on the same probes, not as absolute amounts "
        "of stance. *Separated* means the adapter's mean score is above the 90th percentile of the base "
        "answers' scores."
    )
    if marker.get("reference") or (likelihood or {}).get("reference"):
        how += (
            " *Reference answers* are answers written in the stance (the training set's chosen side), "
            "scored the same way: what a scorer gives the target text itself. Where they do not clear "
            "the base p90, that scorer cannot tell this stance from the base model, whatever the adapter does."
        )
    lines += [
        "",
        "## How the scores work",
        "",
        how,
        "",
        f"## Examples (first {min(examples, n)} of {n} probes)",
        "",
    ]
    for i in range(min(max(examples, 0), n)):
        row = per_answer[i]
        same = base_answers[i].strip() == adapter_answers[i].strip()
        lines += [
            f"### Probe {i + 1}{' (answers identical)' if same else ''}",
            "",
            _fenced(probes[i]),
            "",
            "| | base | adapter |",
            "|---|---|---|",
            f"| marker score | {_num(row.get('base_marker'), 2)} | {_num(row.get('adapter_marker'), 2)} |",
        ]
        if likelihood is not None or "base_likelihood" in row or "adapter_likelihood" in row:
            lines.append(
                f"| likelihood score | {_num(row.get('base_likelihood'))} | {_num(row.get('adapter_likelihood'))} |"
            )
        hits = [", ".join(row.get(k) or []) or "none" if k in row else "n/a" for k in ("base_hits", "adapter_hits")]
        lines += [
            f"| marker hits | {_cell(hits[0])} | {_cell(hits[1])} |",
            "",
            "**Base:**",
            "",
            _fenced(base_answers[i]),
            "",
            "**Adapter:**",
            "",
            _fenced(adapter_answers[i]),
            "",
        ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    logger.info("evaluation report written to %s", path)
    return path
