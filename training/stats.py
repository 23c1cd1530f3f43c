"""Small statistics for behaviour curves: bootstrap confidence intervals and Spearman's rank correlation.

* :func:`bootstrap_mean` : the mean of per-probe scores with a percentile-bootstrap CI.
* :func:`spearman` : Spearman's rho (Pearson correlation of average ranks, ties averaged).
* :func:`sweep_rho` : how monotonically a curve's score follows its x (blend weight), with a
  probe-level bootstrap CI.

scipy is not a dependency: the rank correlation is a few lines of numpy, and the CIs are
bootstrapped, not taken from a distribution (with 5 to 9 sweep points a t-approximation is poor).
This module only computes numbers; it does not generate, score or plot.

Method: percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13),
resampling *probes* (the independent units: every point of a sweep answers the same probes, so one
resample of probe indices is applied to every point together, which keeps the points paired).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Default number of bootstrap resamples and the CI level.
RESAMPLES = 2000
LEVEL = 0.95


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of their ranks) of a 1-D array."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (same length >= 2), in [-1, 1].

    ``nan`` when either side is constant (no ranking to correlate). Equals
    ``scipy.stats.spearmanr(x, y).statistic`` (Pearson's r of the average ranks).

    Raises:
        ValueError: lengths differ or fewer than 2 values.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError("need at least 2 values")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _interval(samples: np.ndarray, level: float) -> list[float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(s, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> dict[str, float | list[float] | int]:
    """Mean of the finite ``values`` and its percentile-bootstrap CI.

    Returns:
        ``{"mean", "ci": [lo, hi], "n"}``; ``mean`` and the CI are ``nan`` when no value is finite.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(resamples, v.size))
    return {"mean": float(v.mean()), "ci": _interval(v[idx].mean(axis=1), level), "n": int(v.size)}


def sweep_rho(xs: Sequence[float], scores: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
              seed: int = 0) -> dict[str, float | list[float]]:
    """Spearman's rho between a sweep's x and its scores, with probe-bootstrap CIs.

    Args:
        xs: the sweep's x values (blend weights), one per point, ``[P]``.
        scores: per-probe scores, ``[P, N]`` (point, probe); ``nan`` for an unscored answer.

    Returns:
        ``{"rho_means", "ci_means", "rho_answers", "ci_answers"}``: ``rho_means`` correlates x with each
        point's mean score (does the curve rise?); ``rho_answers`` correlates x with every single score
        (``P * N`` pairs: how much of the per-answer variation the weight explains in rank). Each CI
        resamples the N probes with replacement (the same probes for every point).

    Raises:
        ValueError: ``scores`` is not ``[len(xs), N]`` with N >= 1.
    """
    x = np.asarray(xs, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != x.size or s.shape[1] < 1:
        raise ValueError(f"scores must be [{x.size}, N], got {s.shape}")

    def both(cols: np.ndarray) -> tuple[float, float]:
        sub = s[:, cols]
        with np.errstate(invalid="ignore"):
            means = np.nanmean(sub, axis=1) if np.isfinite(sub).any(axis=1).all() else np.full(x.size, np.nan)
        rm = spearman(x, means) if np.isfinite(means).all() else float("nan")
        flat_x = np.repeat(x, sub.shape[1])
        flat_s = sub.reshape(-1)
        ok = np.isfinite(flat_s)
        ra = spearman(flat_x[ok], flat_s[ok]) if ok.sum() >= 2 else float("nan")
        return rm, ra

    n = s.shape[1]
    rho_m, rho_a = both(np.arange(n))
    rng = np.random.default_rng(seed)
    boot = np.array([both(rng.integers(0, n, size=n)) for _ in range(resamples)])
    return {"rho_means": rho_m, "ci_means": _interval(boot[:, 0], level),
            "rho_answers": rho_a, "ci_answers": _interval(boot[:, 1], level)}


def paired_delta(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = 0) -> dict[str, float | list[float] | int]:
    """Mean of ``a - b`` over probes scored on both sides, with a bootstrap CI (e.g. anti-stance minus base).

    Raises:
        ValueError: the lengths differ.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in length: {x.shape} vs {y.shape}")
    return bootstrap_mean(x - y, resamples=resamples, level=level, seed=seed)
