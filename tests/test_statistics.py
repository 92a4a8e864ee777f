"""attention_drift.reports.stats: correlations with CIs, AUROC, binned curves, proportions."""

import math

import numpy as np
import pytest
import torch

from attention_drift.reports.stats import (
    StatsError,
    auroc,
    auroc_ci,
    binned_curve,
    bootstrap_interval,
    bootstrap_mean,
    bootstrap_ratio,
    pearson,
    proportion,
    spearman,
)


def _t_tail(t: float, df: int) -> float:
    """Two-sided p of Student's t by numerical integration of its density (independent of scipy)."""
    grid = np.linspace(abs(t), 200, 400001)
    dens = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    return 2 * float(np.trapezoid(dens, grid))


def test_pearson_ci_and_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=28), rng.normal(size=28)
    b = b + 0.5 * a
    c = pearson(a, b)
    assert c.r == pytest.approx(float(np.corrcoef(a, b)[0, 1]), abs=1e-12) and c.n == 28
    z, se = math.atanh(c.r), 1 / math.sqrt(25)  # Fisher z, se = 1 / sqrt(n - 3)
    assert c.ci_low == pytest.approx(math.tanh(z - 1.959964 * se), abs=1e-5)
    assert c.ci_high == pytest.approx(math.tanh(z + 1.959964 * se), abs=1e-5)
    t = c.r * math.sqrt(26 / (1 - c.r ** 2))
    assert c.p_value == pytest.approx(_t_tail(t, 26), rel=1e-4)
    wide = pearson(a, b, confidence=0.99)
    assert wide.ci_low < c.ci_low and wide.ci_high > c.ci_high and wide.confidence == 0.99


def test_spearman_uses_ranks_and_the_fieller_interval():
    x = np.arange(10.0)
    assert spearman(x, np.exp(x)).r == pytest.approx(1.0)
    assert pearson(x, np.exp(x)).r < 0.99
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(size=20)
    c = spearman(a, b)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties here)
    assert c.r == pytest.approx(float(np.corrcoef(ranks(a), ranks(b))[0, 1]), abs=1e-12)
    z, se = math.atanh(c.r), math.sqrt(1.06 / 17)
    assert c.ci_low == pytest.approx(math.tanh(z - 1.959964 * se), abs=1e-5)
    assert c.ci_high == pytest.approx(math.tanh(z + 1.959964 * se), abs=1e-5)
    assert c.p_value == pytest.approx(_t_tail(c.r * math.sqrt(18 / (1 - c.r ** 2)), 18), rel=1e-4)


def test_spearman_ties_use_average_ranks():
    x = [1, 2, 2, 3, 4]
    y = [1, 2.5, 2.5, 4, 5]  # the average ranks of x
    assert spearman(x, y).r == pytest.approx(1.0)
    assert spearman(x, [5, 4, 3, 2, 1]).r == pytest.approx(pearson([1, 2.5, 2.5, 4, 5], [5, 4, 3, 2, 1]).r)


def test_perfect_degenerate_and_unpaired_input():
    x = np.arange(10.0)
    perfect = pearson(x, 2 * x + 1)
    assert perfect.r == pytest.approx(1.0) and perfect.p_value < 1e-12 and perfect.ci_low == pytest.approx(1.0)
    assert pearson(x, -x).r == pytest.approx(-1.0)
    assert pearson([1, 2, float("nan"), 4, 5], [1, 2, 3, 4, 5]).n == 4  # NaN pairs dropped
    for c in (pearson(x, np.ones(10)), spearman(x, np.ones(10)), pearson([1, 2, 3], [1, 3, 2])):
        assert math.isnan(c.r) and math.isnan(c.p_value) and math.isnan(c.ci_low)
    assert pearson(torch.arange(6.0), torch.arange(6.0) ** 2).r == pytest.approx(pearson(x[:6], x[:6] ** 2).r)
    with pytest.raises(StatsError, match="paired"):
        pearson([1, 2, 3, 4], [1, 2, 3])
    assert set(pearson(x, x ** 2).to_dict()) == {"method", "r", "n", "ci_low", "ci_high", "p_value", "confidence"}


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(1.0)
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == pytest.approx(0.0)
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == pytest.approx(0.5)
    # pairs (pos, neg): (0.3 > 0.1), (0.3 < 0.4), (0.6 > 0.1), (0.6 > 0.4) -> 3 / 4
    assert auroc([0.1, 0.3, 0.4, 0.6, float("nan")], [0, 1, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.3 = 0.3) -> 0.5, (0.6 > 0.3) -> 1
    assert auroc([0.3, 0.3, 0.6], [0, 1, 1]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_binned_curve():
    factor = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, float("nan")]
    fails = [0, 0, 0, 1, 0, 1, 1, 1, 1]
    severity = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 9.0]
    curve = binned_curve(factor, fails, severity, n_bins=2, factor_name="f", severity_name="s")
    assert curve.count == (4, 4)
    assert curve.failure_rate == pytest.approx((0.25, 0.75))
    assert curve.mean_factor == pytest.approx((0.25, 0.65))
    assert curve.mean_severity == pytest.approx((0.15, 0.55))
    assert curve.edges[0] == pytest.approx(0.1) and curve.edges[-1] == pytest.approx(0.8)
    assert curve.to_dict()["factor"] == "f"
    empty = binned_curve([float("nan")], [1], [0.0], n_bins=3)
    assert empty.count == (0, 0, 0) and all(math.isnan(v) for v in empty.failure_rate)
    with pytest.raises(StatsError, match="n_bins"):
        binned_curve(factor, fails, severity, n_bins=0)
    with pytest.raises(StatsError, match="one fails and severity value"):
        binned_curve(factor, fails[:-1], severity)


def test_proportion():
    p = proportion([True, True, False, True])
    half = 1.96 * math.sqrt(0.75 * 0.25 / 4)
    assert p["accuracy"] == 0.75 and p["n"] == 4 and p["half_width"] == pytest.approx(half)
    assert p["ci95"] == pytest.approx([0.75 - half, 1.0])  # clipped to [0, 1]
    assert proportion(np.array([1.0, 0.0]))["accuracy"] == 0.5
    none = proportion([])
    assert none["n"] == 0 and math.isnan(none["accuracy"])


def test_auroc_ci_point_estimate_and_methods_agree_on_independent_data():
    rng = np.random.default_rng(3)
    labels = rng.random(400) < 0.4
    scores = rng.normal(size=400) + 0.8 * labels
    boot, delong = auroc_ci(scores, labels), auroc_ci(scores, labels, method="delong")
    assert boot.value == pytest.approx(auroc(scores, labels), abs=1e-12) == delong.value
    assert boot.method == "bootstrap" and delong.method == "delong" and boot.n_boot == 2000
    assert (boot.n, boot.n_pos, boot.n_neg, boot.n_clusters) == (400, int(labels.sum()), int((~labels).sum()), 400)
    assert boot.ci_low < boot.value < boot.ci_high
    # the percentile bootstrap and DeLong's normal interval estimate the same spread
    assert boot.ci_low == pytest.approx(delong.ci_low, abs=0.015)
    assert boot.ci_high == pytest.approx(delong.ci_high, abs=0.015)
    assert auroc_ci(scores, labels) == boot, "a fixed seed gives the same interval"
    assert auroc_ci(scores, labels, seed=1) != boot
    assert set(boot.to_dict()) >= {"value", "ci_low", "ci_high", "n", "n_clusters", "method", "n_pos", "n_neg"}


def test_delong_variance_matches_its_definition():
    x, y = np.array([0.9, 0.7, 0.6, 0.4]), np.array([0.5, 0.3, 0.6, 0.1, 0.2])
    psi = (x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])
    v10, v01 = psi.mean(1), psi.mean(0)
    se = math.sqrt(v10.var(ddof=1) / 4 + v01.var(ddof=1) / 5)
    c = auroc_ci(np.r_[x, y], [1] * 4 + [0] * 5, method="delong")
    assert c.value == pytest.approx(psi.mean())
    assert c.ci_low == pytest.approx(psi.mean() - 1.959964 * se, abs=1e-5)
    assert c.ci_high == pytest.approx(min(1.0, psi.mean() + 1.959964 * se), abs=1e-5)


def test_cluster_bootstrap_resamples_whole_records():
    rng = np.random.default_rng(4)
    labels = rng.random(60) < 0.5
    scores = rng.normal(size=60) + labels
    alone = auroc_ci(scores, labels)
    # every item copied 4 times into its own cluster: drawing clusters is drawing the items
    copies = auroc_ci(np.tile(scores, 4), np.tile(labels, 4), np.tile(np.arange(60), 4))
    assert (copies.ci_low, copies.ci_high, copies.value) == pytest.approx((alone.ci_low, alone.ci_high, alone.value))
    assert copies.method == "cluster bootstrap" and copies.n == 240 and copies.n_clusters == 60
    # ignoring the clusters treats the copies as new evidence: a falsely narrow interval
    naive = auroc_ci(np.tile(scores, 4), np.tile(labels, 4))
    assert naive.ci_high - naive.ci_low < 0.7 * (copies.ci_high - copies.ci_low)


def test_auroc_ci_degenerate_and_bad_input():
    one_class = auroc_ci([0.1, 0.2, 0.3], [1, 1, 1])
    assert math.isnan(one_class.value) and math.isnan(one_class.ci_low) and one_class.n_neg == 0
    nan_dropped = auroc_ci([0.1, float("nan"), 0.3, 0.5], [0, 1, 1, 0], ["a", "a", "b", "c"])
    assert nan_dropped.n == 3 and nan_dropped.n_clusters == 3
    single_cluster = auroc_ci([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], ["r"] * 4)
    assert single_cluster.value == pytest.approx(0.75) and math.isnan(single_cluster.ci_low)
    with pytest.raises(StatsError, match="independent"):
        auroc_ci([0.1, 0.2], [0, 1], [0, 1], method="delong")
    with pytest.raises(StatsError, match="method"):
        auroc_ci([0.1, 0.2], [0, 1], method="exact")
    with pytest.raises(StatsError, match="cluster id"):
        auroc_ci([0.1, 0.2, 0.3], [0, 1, 0], [0, 1])


def test_bootstrap_mean_and_ratio():
    m = bootstrap_mean([1.0, 2.0, float("nan"), 4.0], ["a", "a", "b", "b"])
    assert m.value == pytest.approx(7 / 3) and m.n == 3 and m.n_clusters == 2 and m.name == "mean"
    # two clusters: every resample is {a, a}, {a, b} or {b, b}: means 1.5, 7/3, 4
    assert 1.5 <= m.ci_low <= m.ci_high <= 4.0
    r = bootstrap_ratio([1.0, 3.0, 2.0], [2.0, 2.0, 4.0], [0, 1, 2])
    assert r.value == pytest.approx(6 / 8) and r.method == "cluster bootstrap"
    # the weighted ratio of every resample lies between the smallest and largest item ratio
    assert 0.5 <= r.ci_low <= r.value <= r.ci_high <= 1.5
    assert math.isnan(bootstrap_ratio([1.0, -1.0], [1.0, -1.0]).value)  # zero mean denominator
    with pytest.raises(StatsError, match="paired"):
        bootstrap_ratio([1.0], [1.0, 2.0])
    low, high = bootstrap_interval(lambda w: w @ np.arange(5.0) / w.sum(1), 5, n_boot=500)
    assert 0 <= low < 2 < high <= 4


def test_weighted_coefficients_are_those_of_the_pooled_items():
    from attention_drift.reports.stats import weighted_pearson, weighted_spearman

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 15).astype(float), rng.normal(size=15)   # x with ties
    w = rng.integers(0, 4, (6, 15)).astype(float)
    for row, r, rho in zip(w, weighted_pearson(x, y, w), weighted_spearman(x, y, w)):
        px, py = np.repeat(x, row.astype(int)), np.repeat(y, row.astype(int))
        assert r == pytest.approx(pearson(px, py).r) and rho == pytest.approx(spearman(px, py).r)
    ones = np.ones((1, 15))
    assert weighted_pearson(x, y, ones)[0] == pytest.approx(pearson(x, y).r)
    assert math.isnan(weighted_pearson(x, y, np.eye(15)[:1] * 3)[0]), "one item drawn: constant, NaN"


def test_correlation_ci_and_paired_bootstrap():
    from attention_drift.reports.stats import bootstrap_p_value, correlation_ci, paired_bootstrap, weighted_pearson

    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    clusters = np.repeat(np.arange(20), 3)
    c = correlation_ci(x, y, clusters, n_boot=500)
    assert c.value == pytest.approx(pearson(x, y).r) and c.ci_low < c.value < c.ci_high
    assert c.p_value == pytest.approx(pearson(x, y).p_value) and c.n_clusters == 20 and c.p_bootstrap < 0.01
    assert correlation_ci(x, y, clusters, n_boot=500) == c
    with pytest.raises(StatsError):
        correlation_ci(x, y, method="kendall")
    assert bootstrap_p_value(np.zeros(9)) == 1.0 and bootstrap_p_value(np.ones(9)) == pytest.approx(0.2)
    assert math.isnan(bootstrap_p_value(np.zeros(0)))
    d = paired_bootstrap(lambda w: weighted_pearson(x, y, w), lambda w: weighted_pearson(-x, y, w), 60, clusters,
                         n_boot=300)
    assert d.value == pytest.approx(2 * c.value) and d.a == pytest.approx(c.value) and d.ci_low > 0
    same = paired_bootstrap(lambda w: weighted_pearson(x, y, w), lambda w: weighted_pearson(x, y, w), 60, clusters)
    assert (same.value, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
