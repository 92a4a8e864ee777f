"""Statistics of the analyses: correlations with confidence intervals, AUROC, binned failure
curves and proportion intervals (scipy underneath).

* :func:`pearson` / :func:`spearman`: coefficient, two-sided p-value (``scipy.stats.pearsonr`` /
  ``spearmanr``: Student's t with n - 2 degrees of freedom) and a Fisher-z confidence interval
  ``tanh(atanh(r) -+ z_q se)`` with ``se = sqrt(1 / (n - 3))`` (Pearson) or the
  Fieller-Hartley-Pearson ``sqrt(1.06 / (n - 3))`` (Spearman, average ranks for ties);
* :func:`auroc`: the Mann-Whitney U statistic over (positive, negative) pairs from average ranks
  (``scipy.stats.rankdata``), ties counted one half; :func:`auroc_ci` adds a confidence interval,
  by a (cluster) bootstrap or DeLong's variance;
* :func:`bootstrap_interval`, :func:`bootstrap_mean`, :func:`bootstrap_ratio`: percentile
  intervals of a record-clustered bootstrap. Prompts of one record share its edit, so they are
  not independent draws: resampling whole records (clusters) keeps that dependence in the
  interval, where resampling prompts would make it too narrow;
* :func:`correlation_ci`: Pearson / Spearman with such an interval and a bootstrap p-value
  (:func:`weighted_pearson` / :func:`weighted_spearman`: the coefficient of each resample's
  pooled items); :func:`paired_bootstrap`: the difference of two statistics under the same
  resamples, with its interval and two-sided p-value (:func:`bootstrap_p_value`);
* :func:`binned_curve`: failure rate and mean severity per quantile bin of a factor;
* :func:`proportion`: a proportion with its normal-approximation 95% interval.

Pairs with a NaN are dropped first. Fewer than 4 pairs, or a constant variable, give NaN
(not an exception): a report over a handful of prompts still builds.
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
from jaxtyping import Bool, Float
from torch import Tensor

from attention_drift.core.errors import AttentionDriftError

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


def _auroc_parts(scores: ArrayLike, labels: ArrayLike, clusters: ArrayLike | None):
    """(scores, positive mask, cluster codes) of the finite pairs."""
    s, y = _array(scores), _array(labels)
    if s.shape != y.shape:
        raise StatsError(f"AUROC needs one label per score: got {s.size} scores and {y.size} labels")
    codes = _codes(clusters, s.size)
    keep = np.isfinite(s) & np.isfinite(y)
    return s[keep], y[keep] > 0, codes[keep]


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


# ---------------------------------------------------------------------------------------------
# Intervals: cluster bootstrap and DeLong

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A statistic with its confidence interval.

    Args:
        name: what was estimated (``"mean"``, ``"ratio"``, ``"auroc"``).
        value: the estimate on the data as given (NaN when undefined).
        ci_low, ci_high: the interval at ``confidence`` (NaN when it cannot be formed).
        n: finite items used; n_clusters: distinct clusters among them (records).
        method: ``"cluster bootstrap"`` (clusters resampled), ``"bootstrap"`` (items resampled)
            or ``"delong"``.
        confidence: the interval's level.
        n_boot: bootstrap resamples (0 for DeLong).
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int
    method: str
    confidence: float = 0.95
    n_boot: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AurocEstimate(Estimate):
    """An AUROC with its interval (:func:`auroc_ci`); ``n_pos`` / ``n_neg``: items per class."""

    n_pos: int = 0
    n_neg: int = 0


def _codes(clusters: ArrayLike | None, n: int) -> np.ndarray:
    if clusters is None:
        return np.arange(n)
    ids = clusters.tolist() if isinstance(clusters, (np.ndarray, Tensor)) else list(clusters)
    if len(ids) != n:
        raise StatsError(f"give one cluster id per item: got {len(ids)} ids for {n} items")
    first: dict = {}
    return np.array([first.setdefault(repr(c), len(first)) for c in ids], dtype=np.int64).reshape(n)


def bootstrap_values(statistic, n: int, clusters: ArrayLike | None = None, *, n_boot: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED, chunk: int = 256) -> np.ndarray:
    """The finite values of ``statistic`` over ``n_boot`` bootstrap resamples (empty when there is
    a single cluster).

    ``statistic(weights)`` takes a ``[b, n]`` array (how many times each of the ``n`` items is
    drawn in each of ``b`` resamples) and returns ``b`` values. With ``clusters`` (one id per
    item, e.g. the record of each prompt) whole clusters are drawn with replacement, as many as
    there are clusters, and every item weighs as often as its cluster is drawn; without, items
    are drawn. NaN resamples (e.g. one class missing) are dropped. ``seed`` fixes the draws (the
    same data give the same values; ``chunk``, resamples drawn at a time, does not change them).
    """
    codes = _codes(clusters, n)
    k = int(codes.max()) + 1 if n else 0
    if k < 2 or n_boot < 1:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, k, size=(b, k))
        counts = np.zeros((b, k))
        np.add.at(counts, (np.arange(b)[:, None], draws), 1.0)
        values.append(np.asarray(statistic(counts[:, codes]), dtype=np.float64))
    values = np.concatenate(values)
    return values[np.isfinite(values)]


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap values; NaN when there are none."""
    if values.size == 0:
        return math.nan, math.nan
    tail = 50 * (1 - confidence)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(statistic, n: int, clusters: ArrayLike | None = None, *, confidence: float = 0.95,
                       n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       chunk: int = 256) -> tuple[float, float]:
    """Percentile interval of ``statistic`` under the bootstrap (:func:`bootstrap_values`); NaN
    when no resample gives a finite value or there is a single cluster."""
    return percentile_interval(bootstrap_values(statistic, n, clusters, n_boot=n_boot, seed=seed, chunk=chunk),
                               confidence)


def _method(clusters) -> str:
    return "bootstrap" if clusters is None else "cluster bootstrap"


def bootstrap_ratio(numerator: ArrayLike, denominator: ArrayLike, clusters: ArrayLike | None = None, *,
                    name: str = "ratio", confidence: float = 0.95, n_boot: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> Estimate:
    """``mean(numerator) / mean(denominator)`` (a pooled fraction, e.g. the share of the edit's
    log-odds change a patch reproduces) with a (cluster) bootstrap interval; pairs with a NaN
    are dropped; NaN when the denominator's mean is 0."""
    a, b = _array(numerator), _array(denominator)
    if a.shape != b.shape:
        raise StatsError(f"a ratio needs paired values: got {a.size} numerators and {b.size} denominators")
    keep = np.isfinite(a) & np.isfinite(b)
    codes = _codes(clusters, a.size)[keep]
    a, b = a[keep], b[keep]
    value = float(a.mean() / b.mean()) if a.size and b.mean() != 0 else math.nan

    def statistic(w):
        den = w @ b
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den != 0, (w @ a) / np.where(den != 0, den, 1.0), np.nan)

    low, high = bootstrap_interval(statistic, a.size, codes, confidence=confidence, n_boot=n_boot, seed=seed)
    return Estimate(name, value, low, high, int(a.size), int(np.unique(codes).size), _method(clusters), confidence,
                    n_boot)


def bootstrap_mean(values: ArrayLike, clusters: ArrayLike | None = None, *, confidence: float = 0.95,
                   n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """The mean of ``values`` (NaN dropped) with a (cluster) bootstrap interval."""
    x = _array(values)
    return bootstrap_ratio(x, np.ones_like(x), clusters, name="mean", confidence=confidence, n_boot=n_boot, seed=seed)


def weighted_auroc(s: Float[np.ndarray, " n"], positive: Bool[np.ndarray, " n"],
                   weights: Float[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """AUROC per row of ``weights`` [b, n]: the Mann-Whitney statistic with every item counted
    as often as its weight (ties one half)."""
    order = np.argsort(s, kind="stable")
    s, positive, weights = s[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(weights * positive, starts, axis=1)
    neg = np.add.reduceat(weights * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(1) * neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(1) / np.where(total > 0, total, 1.0), np.nan)


def _delong(s: np.ndarray, positive: np.ndarray, confidence: float) -> tuple[float, float]:
    """DeLong's interval: AUROC -+ z se, se from the structural components (placements) of the
    positives and negatives (Sun & Xu's rank form), clipped to [0, 1]."""
    x, y = s[positive], s[~positive]
    m, n = x.size, y.size
    if m < 2 or n < 2:
        return math.nan, math.nan
    ranks = scipy.stats.rankdata(np.r_[x, y])
    v10 = (ranks[:m] - scipy.stats.rankdata(x)) / n
    v01 = 1.0 - (ranks[m:] - scipy.stats.rankdata(y)) / m
    se = math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    auc = float(v10.mean())
    zq = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    return max(0.0, auc - zq * se), min(1.0, auc + zq * se)


AUROC_METHODS = ("bootstrap", "delong")


def auroc_ci(scores: ArrayLike, labels: ArrayLike, clusters: ArrayLike | None = None, *,
             method: str = "bootstrap", confidence: float = 0.95, n_boot: int = BOOTSTRAP_SAMPLES,
             seed: int = BOOTSTRAP_SEED) -> AurocEstimate:
    """:func:`auroc` with a confidence interval.

    ``method="bootstrap"``: percentile interval of :func:`bootstrap_interval`, resampling
    ``clusters`` (e.g. each prompt's record, whose prompts share one edit) when given, else
    items. ``"delong"``: DeLong's normal interval, for independent items only (no
    ``clusters``). Pairs with a NaN are dropped; value and interval are NaN when a class is
    empty.
    """
    if method not in AUROC_METHODS:
        raise StatsError(f"method must be one of {AUROC_METHODS}, not {method!r}")
    if method == "delong" and clusters is not None:
        raise StatsError("DeLong's interval assumes independent items; use method='bootstrap' with clusters")
    s, positive, codes = _auroc_parts(scores, labels, clusters)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    value = float(weighted_auroc(s, positive, np.ones((1, s.size)))[0]) if s.size else math.nan
    if method == "delong":
        low, high = _delong(s, positive, confidence) if math.isfinite(value) else (math.nan, math.nan)
        how, boots = "delong", 0
    else:
        low, high = (bootstrap_interval(lambda w: weighted_auroc(s, positive, w), s.size, codes,
                                        confidence=confidence, n_boot=n_boot, seed=seed)
                     if math.isfinite(value) else (math.nan, math.nan))
        how, boots = _method(clusters), n_boot
    return AurocEstimate("auroc", value, low, high, int(s.size), int(np.unique(codes).size), how, confidence,
                         boots, n_pos, n_neg)


def distinct_records(case_ids) -> int:
    """How many distinct records ``case_ids`` (one per prompt) name."""
    return len({json.dumps(c) for c in case_ids})


# ---------------------------------------------------------------------------------------------
# Correlations and paired differences under the (cluster) bootstrap


def bootstrap_p_value(values: Float[np.ndarray, " b"], null: float = 0.0) -> float:
    """Two-sided p-value of ``null`` from bootstrap values of a statistic: twice the smaller
    share of values at or below / at or above ``null``, with one pseudo-count
    (``2 (k + 1) / (B + 1)``, capped at 1; so at least ``2 / (B + 1)``). It is the level at which
    the percentile interval just reaches ``null``: p < 0.05 where the 95% interval excludes it.
    NaN without values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    k = min(int((v <= null).sum()), int((v >= null).sum()))
    return float(min(1.0, 2 * (k + 1) / (v.size + 1)))


def _rows_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Pearson r per row of ``w`` [b, n]; ``x``, ``y``: [n] or [b, n]. NaN where
    either variable is constant over the items drawn (weight > 0)."""
    x, y = np.broadcast_to(x, w.shape), np.broadcast_to(y, w.shape)
    total = w.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = x - (w * x).sum(1, keepdims=True) / total
        dy = y - (w * y).sum(1, keepdims=True) / total
        sxy, sxx, syy = (w * dx * dy).sum(1), (w * dx * dx).sum(1), (w * dy * dy).sum(1)
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    drawn = w > 0

    def varies(v):
        low = np.where(drawn, v, np.inf).min(1, initial=np.inf)
        return low < np.where(drawn, v, -np.inf).max(1, initial=-np.inf)

    return np.where(varies(x) & varies(y), r, np.nan)


def _rows_midranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of ``x`` [n] in the pooled sample
    of each row of ``w`` [b, n], where item i appears ``w[:, i]`` times."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    counts = np.add.reduceat(w[:, order], np.flatnonzero(new), axis=1)
    mid = np.cumsum(counts, axis=1) - counts + (counts + 1) / 2
    ranks = np.empty(w.shape)
    ranks[:, order] = mid[:, np.cumsum(new) - 1]
    return ranks


def weighted_pearson(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"],
                     weights: Float[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """Pearson r per row of ``weights``, every item counted as often as its weight (with the
    integer weights of :func:`bootstrap_values`: the r of the resample's pooled items): the
    weighted covariance over the square root of the weighted variances. NaN where either
    variable is constant over the items drawn."""
    return _rows_pearson(_array(x), _array(y), np.atleast_2d(np.asarray(weights, dtype=np.float64)))


def weighted_spearman(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"],
                      weights: Float[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """Spearman rho per row of ``weights``: :func:`weighted_pearson` of the average ranks each
    variable takes in the pooled sample (item i counted ``weights[:, i]`` times; ties share
    their mean rank, as :func:`spearman`)."""
    x, y = _array(x), _array(y)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return _rows_pearson(_rows_midranks(x, w), _rows_midranks(y, w), w)


@dataclass(frozen=True)
class CorrelationEstimate(Estimate):
    """A correlation (:func:`correlation_ci`; ``name``: ``"pearson"`` or ``"spearman"``) with a
    bootstrap interval. ``p_value``: scipy's two-sided Student-t p of r = 0, which takes the
    items as independent; ``p_bootstrap``: :func:`bootstrap_p_value` of 0 under the same
    resamples as the interval (clusters kept together)."""

    p_value: float = math.nan
    p_bootstrap: float = math.nan


CORRELATIONS = {"pearson": weighted_pearson, "spearman": weighted_spearman}


def correlation_ci(x: ArrayLike, y: ArrayLike, clusters: ArrayLike | None = None, *, method: str = "pearson",
                   confidence: float = 0.95, n_boot: int = BOOTSTRAP_SAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> CorrelationEstimate:
    """:func:`pearson` or :func:`spearman` (``method``) of paired values with a percentile
    interval of a (cluster) bootstrap: ``clusters`` (e.g. each prompt's record) are drawn with
    replacement and the coefficient recomputed on the pooled items of the drawn clusters
    (:func:`weighted_pearson` / :func:`weighted_spearman`); without, items are drawn. Pairs with
    a NaN are dropped first; the same data and ``seed`` give the same draws, so statistics of
    the same items share their resamples. NaN below 4 pairs or for a constant variable."""
    if method not in CORRELATIONS:
        raise StatsError(f"method must be one of {tuple(CORRELATIONS)}, not {method!r}")
    a, b = _array(x), _array(y)
    if a.shape != b.shape:
        raise StatsError(f"correlation needs paired data: got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    codes = _codes(clusters, a.size)[keep]
    a, b = a[keep], b[keep]
    point = _correlation(method, a, b, confidence)
    values = (bootstrap_values(lambda w: CORRELATIONS[method](a, b, w), a.size, codes, n_boot=n_boot, seed=seed)
              if math.isfinite(point.r) else np.zeros(0))
    low, high = percentile_interval(values, confidence)
    return CorrelationEstimate(method, point.r, low, high, int(a.size), int(np.unique(codes).size),
                               _method(clusters), confidence, n_boot, point.p_value, bootstrap_p_value(values))


@dataclass(frozen=True)
class PairedDifference(Estimate):
    """``value`` = ``a`` - ``b``, two statistics of the same items (:func:`paired_bootstrap`),
    with the percentile interval and the two-sided :func:`bootstrap_p_value` of 0 from
    resamples that draw the same items (clusters) for both."""

    a: float = math.nan
    b: float = math.nan
    p_value: float = math.nan


def paired_bootstrap(statistic_a, statistic_b, n: int, clusters: ArrayLike | None = None, *,
                     name: str = "difference", confidence: float = 0.95, n_boot: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """The paired bootstrap of ``statistic_a - statistic_b``: each takes the ``[b, n]`` weights
    of :func:`bootstrap_values` (and ``[1, n]`` ones for the data as given) and returns ``b``
    values; both are evaluated on the same resamples, so what the two share (the items, the
    records) cancels in the difference. Resamples where either is NaN are dropped."""
    if n == 0:
        return PairedDifference(name, math.nan, math.nan, math.nan, 0, 0, _method(clusters), confidence, n_boot)
    ones = np.ones((1, n))
    a, b = float(np.asarray(statistic_a(ones))[0]), float(np.asarray(statistic_b(ones))[0])
    values = bootstrap_values(lambda w: np.asarray(statistic_a(w)) - np.asarray(statistic_b(w)), n, clusters,
                              n_boot=n_boot, seed=seed)
    low, high = percentile_interval(values, confidence)
    return PairedDifference(name, a - b, low, high, n, int(np.unique(_codes(clusters, n)).size) if n else 0,
                            _method(clusters), confidence, n_boot, a, b, bootstrap_p_value(values))
