"""Statistics of the analyses: correlations with confidence intervals, AUROC, binned failure
curves and proportion intervals (scipy underneath).

* :func:`pearson` / :func:`spearman`: coefficient, two-sided p-value (``scipy.stats.pearsonr`` /
  ``spearmanr``: Student's t with n - 2 degrees of freedom) and a Fisher-z confidence interval
  ``tanh(atanh(r) -+ z_q se)`` with ``se = sqrt(1 / (n - 3))`` (Pearson) or the
  Fieller-Hartley-Pearson ``sqrt(1.06 / (n - 3))`` (Spearman, average ranks for ties);
* :func:`auroc`: the Mann-Whitney U statistic over (positive, negative) pairs from average ranks
  (``scipy.stats.rankdata``), ties counted one half;
* :func:`binned_curve`: failure rate and mean severity per quantile bin of a factor;
* :func:`proportion`: a proportion with its normal-approximation 95% interval.

Pairs with a NaN are dropped first. Fewer than 4 pairs, or a constant variable, give NaN
(not an exception): a report over a handful of prompts still builds.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
from torch import Tensor

from attention_drift.errors import AttentionDriftError

ArrayLike = Sequence | np.ndarray | Tensor


class StatsError(AttentionDriftError):
    """Unusable input to a statistic (unpaired data, no bins)."""


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient with its confidence interval and two-sided p-value.

    Args:
        method: ``"pearson"`` or ``"spearman"``.
        r: the coefficient (NaN with fewer than 4 finite pairs or a constant variable).
        n: finite pairs used.
        ci_low, ci_high: the Fisher-z interval at ``confidence`` (``r`` itself when |r| = 1).
        p_value: two-sided p-value of r = 0.
        confidence: the interval's level.
    """

    method: str
    r: float
    n: int
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("method", "r", "n", "ci_low", "ci_high", "p_value", "confidence")}


def _array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _clean_pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(x), _array(y)
    if x.shape != y.shape:
        raise StatsError(f"correlation needs paired data: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _correlation(method: str, x: np.ndarray, y: np.ndarray, confidence: float) -> Correlation:
    n = int(x.size)
    nan = float("nan")
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(method, nan, n, nan, nan, nan, confidence)
    result = scipy.stats.pearsonr(x, y) if method == "pearson" else scipy.stats.spearmanr(x, y)
    r, p = float(np.clip(result.statistic, -1.0, 1.0)), float(result.pvalue)
    if abs(r) >= 1.0:
        return Correlation(method, r, n, r, r, 0.0, confidence)
    se = math.sqrt((1.0 if method == "pearson" else 1.06) / (n - 3))
    zq = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    z = math.atanh(r)
    return Correlation(method, r, n, math.tanh(z - zq * se), math.tanh(z + zq * se), p, confidence)


def pearson(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> Correlation:
    """Pearson correlation of paired values (see :class:`Correlation`)."""
    return _correlation("pearson", *_clean_pairs(x, y), confidence)


def spearman(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> Correlation:
    """Spearman rank correlation, average ranks for ties (see :class:`Correlation`)."""
    return _correlation("spearman", *_clean_pairs(x, y), confidence)


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` predicting boolean ``labels``: the Mann-Whitney U
    statistic over (positive x negative) pairs, ties counted one half; NaN scores dropped; NaN
    when either class is empty."""
    s, y = _clean_pairs(scores, labels)
    positive = y > 0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(s, method="average")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class BinnedCurve:
    """Failure by factor quantile bin.

    Bins are the factor's ``n_bins`` quantile intervals (lower edge inclusive for the first bin,
    upper edges inclusive); per bin: count, mean factor, failure rate (fraction of prompts the
    edited model fails) and mean severity. Empty bins (ties) hold NaN.
    """

    factor: str
    severity: str
    edges: tuple[float, ...]
    count: tuple[int, ...]
    mean_factor: tuple[float, ...]
    failure_rate: tuple[float, ...]
    mean_severity: tuple[float, ...]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("factor", "severity", "edges", "count", "mean_factor",
                                              "failure_rate", "mean_severity")}


def binned_curve(factor: ArrayLike, fails: ArrayLike, severity: ArrayLike, n_bins: int = 5, *,
                 factor_name: str = "", severity_name: str = "") -> BinnedCurve:
    """Failure rate and mean severity per quantile bin of ``factor`` (NaN factors dropped)."""
    if n_bins < 1:
        raise StatsError(f"n_bins must be >= 1, not {n_bins}")
    f, fl, sv = _array(factor), _array(fails), _array(severity)
    if not f.shape == fl.shape == sv.shape:
        raise StatsError(f"binned_curve needs one fails and severity value per factor value: got "
                         f"{f.size}, {fl.size} and {sv.size}")
    keep = np.isfinite(f)
    f, fl, sv = f[keep], fl[keep], sv[keep]
    if f.size == 0:
        nan = (float("nan"),) * n_bins
        return BinnedCurve(factor_name, severity_name, (float("nan"),) * (n_bins + 1), (0,) * n_bins, nan, nan, nan)
    edges = np.quantile(f, np.linspace(0, 1, n_bins + 1))
    index = np.clip(np.searchsorted(edges, f, side="left") - 1, 0, n_bins - 1)
    count, mean_f, rate, mean_s = [], [], [], []
    for b in range(n_bins):
        sel = index == b
        count.append(int(sel.sum()))
        empty = not sel.any()
        mean_f.append(float("nan") if empty else float(f[sel].mean()))
        rate.append(float("nan") if empty else float(fl[sel].mean()))
        mean_s.append(float("nan") if empty else float(np.nanmean(sv[sel])))
    return BinnedCurve(factor_name, severity_name, tuple(float(e) for e in edges), tuple(count),
                       tuple(mean_f), tuple(rate), tuple(mean_s))


def proportion(successes: ArrayLike) -> dict:
    """``{"accuracy", "ci95", "half_width", "n"}`` of boolean ``successes``: the fraction and its
    normal-approximation 95% interval (clipped to [0, 1]); NaN for no data."""
    hits = _array(successes) > 0
    n = int(hits.size)
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "ci95": [nan, nan], "half_width": nan, "n": 0}
    p = float(hits.mean())
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    return {"accuracy": p, "ci95": [max(0.0, p - half), min(1.0, p + half)], "half_width": half, "n": n}
