"""Blend response curves (``stanceserve eval --sweep``): does the blend weight work as a dial?

For each stance ``S`` the weight ``w`` of the blend ``{S: w}`` is swept (default
:data:`WEIGHTS`, negative weights included: the "anti-stance"); for each pair ``(A, B)`` the
interpolation ``{A: 1-t, B: t}`` is swept over :data:`TS`. At every point the same held-out
probes are answered greedily through the engine's *live* blend (the request's ``stances``,
as the server runs it: ``W x + sum_i w_i (alpha_i/r_i) B_i A_i x`` per layer, never a merged
copy), and the answers are scored for the stance(s) of the curve with
:mod:`training.scoring` (the likelihood-ratio scorer when a scoring model is given, and the
marker scorer). Weight 0 is the base model; points that ask for the same blend are generated once.

Per point: mean score with a bootstrap 95% CI, the fraction of answers that differ from the
base model's. Per curve and scored stance: Spearman's rho of score vs weight with its CI
(:func:`training.stats.sweep_rho`) and, for stance curves, the anti-stance effect (score at
the most negative weight minus the base score, paired per probe). Plots and the Markdown
report are written by :mod:`training.sweep_report`.

Not here: generation backends (:mod:`training.evaluate`), scorers (:mod:`training.scoring`),
statistics (:mod:`training.stats`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.report import fraction_different
from training.scoring import MARKERS, marker_score
from training.stats import RESAMPLES, bootstrap_mean, paired_delta, sweep_rho

logger = logging.getLogger(__name__)

#: Stance weights swept per stance.
WEIGHTS = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
#: Interpolation steps t of (1-t)·A + t·B per pair.
TS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Version of the JSON layout written by :func:`run_sweep`.
SCHEMA_VERSION = 1

Blend = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Curve:
    """One swept curve.

    Attributes:
        name: ``"S"`` for a stance curve, ``"A+B"`` for a pair.
        kind: ``"stance"`` or ``"pair"``.
        members: the adapters swept (1 or 2); every member's stance is scored.
        xs: the swept values (weights, or t).
    """

    name: str
    kind: str
    members: tuple[str, ...]
    xs: tuple[float, ...]

    def blend(self, x: float) -> dict[str, float]:
        """The blend at ``x``: ``{S: x}`` or ``{A: 1-x, B: x}``."""
        if self.kind == "stance":
            return {self.members[0]: x}
        a, b = self.members
        return {a: 1.0 - x, b: x}


def curves(stances: Sequence[str], *, weights: Sequence[float] = WEIGHTS, ts: Sequence[float] = TS,
           pairs: bool = True) -> list[Curve]:
    """One stance curve per stance, then one pair curve per unordered pair (in the given order).

    Raises:
        ValueError: no stance, a repeated one, or fewer than 2 sweep values.
    """
    if not stances or len(set(stances)) != len(stances):
        raise ValueError(f"give distinct stances, got {list(stances)}")
    if len(weights) < 2 or len(ts) < 2:
        raise ValueError("a sweep needs at least 2 weights and 2 values of t")
    out = [Curve(s, "stance", (s,), tuple(float(w) for w in weights)) for s in stances]
    if pairs:
        out += [Curve(f"{a}+{b}", "pair", (a, b), tuple(float(t) for t in ts))
                for a, b in itertools.combinations(stances, 2)]
    return out


def blend_key(blend: dict[str, float]) -> Blend:
    """A hashable, canonical form of a blend: zero terms dropped, weights rounded to 1e-9, sorted by name."""
    return tuple(sorted((a, round(float(w), 9)) for a, w in blend.items() if round(float(w), 9) != 0))


def _pct(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def run_sweep(
    gen: Any,
    stances: Sequence[str],
    probes: list[str],
    *,
    weights: Sequence[float] = WEIGHTS,
    ts: Sequence[float] = TS,
    pairs: bool = True,
    max_tokens: int = 64,
    likelihood_scorer: Any = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> tuple[dict[str, Any], dict[Blend, list[str]]]:
    """Answer ``probes`` at every point of every curve through ``gen``'s live blends and score them.

    Args:
        gen: a :class:`training.evaluate.Generator` (``generate_rows`` serves blends live).
        stances: adapter names, each also a stance of :data:`training.scoring.MARKERS` (its scorer).
        probes: held-out prompts, the same at every point.
        likelihood_scorer: a :class:`training.scoring.LikelihoodScorer` on the *base* model, or ``None``
            (marker scores only).
        progress: ``progress(task description, total) -> advance()``, e.g. a rich progress bar's task.

    Returns:
        ``(result, answers)``: ``result`` is the JSON-ready summary (see "Blend response curves" in
        docs/training.md for its fields); ``answers`` maps each distinct blend (:func:`blend_key`; ``()`` is
        the base model) to its answers, in probe order.

    Raises:
        ValueError: no probes, or a stance without a scorer.
    """
    if not probes:
        raise ValueError("no probes")
    for s in stances:
        if s not in MARKERS:
            raise ValueError(f"{s!r} is not a scored stance (one of {sorted(MARKERS)})")
    cs = curves(stances, weights=weights, ts=ts, pairs=pairs)
    blends: dict[Blend, dict[str, float]] = {(): {}}
    for c in cs:
        for x in c.xs:
            blends.setdefault(blend_key(c.blend(x)), dict(blend_key(c.blend(x))))
    keys = list(blends)
    rows = [(p, blends[k]) for k in keys for p in probes]
    advance = progress("generate", len(rows)) if progress else None
    flat = gen.generate_rows(rows, max_tokens, advance)
    n = len(probes)
    answers = {k: flat[i * n:(i + 1) * n] for i, k in enumerate(keys)}

    # every (blend, stance) pair that a curve needs, scored once
    wanted = sorted({(blend_key(c.blend(x)), s) for c in cs for x in c.xs for s in c.members} |
                    {((), s) for s in stances})
    scorers = {"marker": lambda prompts, texts, s: [marker_score(t, s) for t in texts]}
    if likelihood_scorer is not None:
        scorers = {"likelihood": likelihood_scorer.score, **scorers}
    scores: dict[tuple[Blend, str, str], np.ndarray] = {}
    advance = progress("score", len(wanted) * len(scorers)) if progress else None
    for (k, s) in wanted:
        for sc_name, fn in scorers.items():
            scores[(k, s, sc_name)] = np.asarray(fn(probes, answers[k], s), dtype=np.float64)
            if advance:
                advance()

    out_curves = []
    for c in cs:
        points = []
        for x in c.xs:
            k = blend_key(c.blend(x))
            points.append({
                "x": x, "blend": c.blend(x),
                "fraction_different": fraction_different(answers[()], answers[k]),
                "scores": {s: {sc: bootstrap_mean(scores[(k, s, sc)], resamples=resamples, seed=seed)
                               for sc in scorers} for s in c.members},
            })
        trend: dict[str, Any] = {}
        anti: dict[str, Any] = {}
        for s in c.members:
            trend[s] = {}
            for sc in scorers:
                mat = np.stack([scores[(blend_key(c.blend(x)), s, sc)] for x in c.xs])
                # a pair's t moves weight from A to B: A's score should fall, B's rise
                trend[s][sc] = sweep_rho(c.xs, mat, resamples=resamples, seed=seed)
            if c.kind == "stance" and min(c.xs) < 0:
                lo = blend_key(c.blend(min(c.xs)))
                anti[s] = {"weight": min(c.xs), **{sc: paired_delta(scores[(lo, s, sc)], scores[((), s, sc)],
                                                                     resamples=resamples, seed=seed)
                                                   for sc in scorers}}
        out_curves.append({"name": c.name, "kind": c.kind, "members": list(c.members),
                           "x_label": "weight" if c.kind == "stance" else "t",
                           "points": points, "spearman": trend, "anti_stance": anti or None})
    result = {
        "schema_version": SCHEMA_VERSION,
        "base_model": gen.base_name,
        "probes": n,
        "max_tokens": max_tokens,
        "weights": _pct(np.asarray(weights, dtype=np.float64)),
        "ts": _pct(np.asarray(ts, dtype=np.float64)),
        "scorers": list(scorers),
        "primary_scorer": next(iter(scorers)),
        "bootstrap": {"resamples": resamples, "level": 0.95, "seed": seed, "unit": "probe"},
        "generations": len(rows),
        "curves": out_curves,
    }
    return result, answers


def write_answers(path: Path, probes: list[str], answers: dict[Blend, list[str]]) -> Path:
    """Every answer as JSONL: ``{"blend": {adapter: weight}, "probe": i, "prompt", "answer"}``."""
    with open(path, "w") as f:
        for k, texts in answers.items():
            for i, (p, a) in enumerate(zip(probes, texts)):
                f.write(json.dumps({"blend": dict(k), "probe": i, "prompt": p, "answer": a}) + "\n")
    return path
