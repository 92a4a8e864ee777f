"""attention_drift.stats: correlations with CIs, AUROC, binned curves, proportions."""

import math

import numpy as np
import pytest
import torch

from attention_drift.stats import StatsError, auroc, binned_curve, pearson, proportion, spearman


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
