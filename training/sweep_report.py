"""Plots and the Markdown report of a blend sweep (:mod:`training.sweep`).

:func:`plot_curve` draws one PNG per curve (matplotlib, Agg backend: no display needed):
the mean score of each scored stance against the weight (or t) with its bootstrap 95% CI as
a band, for each scorer in its own panel, and the fraction of answers that differ from the base
model on a right-hand axis. :func:`write_sweep_report` writes the Markdown report: the trend
table (Spearman rho with CIs), the anti-stance effect, a table per curve, and a few real
answers side by side at x = 0, 0.5 and 1. This module reads the sweep's result; it does not
generate or score.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from training.report import runtime_lines
from training.sweep import Blend, blend_key

#: x values whose answers the report shows side by side.
SHOWN_XS = (0.0, 0.5, 1.0)


def curve_filename(name: str) -> str:
    """A safe PNG file name for a curve (``a+b`` -> ``a+b.png``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) + ".png"


def plot_curve(curve: dict[str, Any], scorers: list[str], path: Path, *, title: str | None = None) -> Path:
    """One PNG for one curve of a sweep result (one panel per scorer). Returns ``path``."""
    import matplotlib  # [train] extra: kept out of the server (and the backend is chosen before pyplot loads)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["x"] for p in curve["points"]]
    fig, axes = plt.subplots(1, len(scorers), figsize=(5.2 * len(scorers), 3.8), squeeze=False)
    for ax, sc in zip(axes[0], scorers):
        for s in curve["members"]:
            mean = [p["scores"][s][sc]["mean"] for p in curve["points"]]
            lo = [p["scores"][s][sc]["ci"][0] for p in curve["points"]]
            hi = [p["scores"][s][sc]["ci"][1] for p in curve["points"]]
            rho = curve["spearman"][s][sc]["rho_means"]
            ax.plot(xs, mean, marker="o", label=f"{s} score (rho={rho:+.2f})")
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.axvline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(curve["x_label"] if curve["kind"] == "stance" else f"t in (1-t)·{curve['members'][0]} + t·{curve['members'][1]}")
        ax.set_ylabel(f"{sc} score (mean, 95% CI)")
        ax.set_title(sc)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(xs, [p["fraction_different"] for p in curve["points"]], color="black", ls="--", lw=1,
                  label="fraction ≠ base")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("fraction of answers ≠ base")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    fig.suptitle(title or curve["name"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _ci(ci: list[float], digits: int = 3) -> str:
    return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "*(empty)*"


def write_sweep_report(path: Path, result: dict[str, Any], probes: list[str], answers: dict[Blend, list[str]],
                       *, pngs: dict[str, str], command: str | None = None, examples: int = 3) -> Path:
    """The Markdown report of a sweep: trends, anti-stance, per-point tables, answers side by side.

    Args:
        pngs: curve name -> PNG path relative to the report.
        examples: probes shown side by side per curve.
    """
    lines = [
        "# Blend response curves",
        "",
        f"Base model `{result['base_model']}`, {result['probes']} held-out probes, greedy, "
        f"{result['max_tokens']} tokens per answer, {result['generations']} generations through the engine's "
        "live blend (no merged weights). Scores: " + ", ".join(f"`{s}`" for s in result["scorers"]) +
        f" (see `training/scoring.py`); CIs: percentile bootstrap over probes, {result['bootstrap']['resamples']} "
        "resamples.",
        "",
    ]
    if result.get("runtime") is not None:
        lines += [*runtime_lines(result["runtime"]), ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["## Does the score follow the weight?", "",
              "Spearman rho between the weight (t for pairs) and the mean score of each point, with its 95% CI; "
              "`rho (answers)` correlates the weight with every single answer's score.", "",
              "| curve | scored stance | scorer | rho (means) | 95% CI | rho (answers) | 95% CI |",
              "|---|---|---|---|---|---|---|"]
    for c in result["curves"]:
        for s in c["members"]:
            for sc in result["scorers"]:
                t = c["spearman"][s][sc]
                lines.append(f"| {c['name']} | {s} | {sc} | {_f(t['rho_means'], 2)} | {_ci(t['ci_means'], 2)} | "
                             f"{_f(t['rho_answers'], 2)} | {_ci(t['ci_answers'], 2)} |")
    anti_rows = [(c, s, a) for c in result["curves"] if c["anti_stance"] for s, a in c["anti_stance"].items()]
    if anti_rows:
        lines += ["", "## Anti-stance (negative weight)", "",
                  "Score at the most negative weight minus the base model's score, paired per probe.", "",
                  "| stance | weight | scorer | mean difference | 95% CI |", "|---|---|---|---|---|"]
        for c, s, a in anti_rows:
            for sc in result["scorers"]:
                lines.append(f"| {s} | {a['weight']:g} | {sc} | {_f(a[sc]['mean'])} | {_ci(a[sc]['ci'])} |")
    for c in result["curves"]:
        lines += ["", f"## {c['name']}", ""]
        if c["name"] in pngs:
            lines += [f"![{c['name']}]({pngs[c['name']]})", ""]
        head = "| " + c["x_label"] + " | ≠ base | " + " | ".join(f"{s} {sc}" for s in c["members"] for sc in result["scorers"]) + " |"
        lines += [head, "|" + "---|" * (2 + len(c["members"]) * len(result["scorers"]))]
        for p in c["points"]:
            cells = [f"{_f(p['scores'][s][sc]['mean'])} {_ci(p['scores'][s][sc]['ci'])}"
                     for s in c["members"] for sc in result["scorers"]]
            lines.append(f"| {p['x']:g} | {p['fraction_different']:.2f} | " + " | ".join(cells) + " |")
        shown = [p for p in c["points"] if any(abs(p["x"] - x) < 1e-9 for x in SHOWN_XS)]
        if shown:
            lines += ["", "Answers side by side (first probes, greedy):", "",
                      "| probe | " + " | ".join(f"{c['x_label']}={p['x']:g}" for p in shown) + " |",
                      "|---|" + "---|" * len(shown)]
            for i in range(min(examples, len(probes))):
                cells = []
                for p in shown:
                    text = answers[blend_key(p["blend"])][i]
                    cells.append(_cell(text))
                lines.append(f"| {_cell(probes[i], 120)} | " + " | ".join(cells) + " |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
