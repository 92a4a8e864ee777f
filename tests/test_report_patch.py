"""The patch report's contamination: log-odds damage beside the paper's P(true) drop."""

import math

import numpy as np
import pytest

from attention_drift.reports.paper import CONTAMINATION as PAPER
from attention_drift.reports.patch import contamination_markdown, contamination_p_true, patch_from_lines
from attention_drift.views.report_figures import contamination_figure
from synthetic_patch import synthetic_patch_lines


def _report(**kw) -> dict:
    result = patch_from_lines(synthetic_patch_lines(range(6), **kw))
    result["contamination"]["window"] = 2
    return result


def test_p_true_drop_is_stored_with_intervals_and_reported_beside_log_odds():
    lines = synthetic_patch_lines(range(6))
    result = _report()
    c = result["contamination"]
    last = c["damage"]["components"]["mlp_out"]["by_position"]["last"]
    entries = [e for line in lines for e in line["contamination"]]
    expected = [math.exp(e["pre"][0]) - math.exp(e["components"]["mlp_out"]["lp_true"][2][1]) for e in entries]
    assert last["p_true_drop"][1] == pytest.approx(np.mean(expected))
    lo, hi = last["p_true_drop_ci95"][1]
    assert lo <= last["p_true_drop"][1] <= hi and lo < hi
    p_true = contamination_p_true(c)
    best = p_true["mlp_out"]["best"]
    assert best["label"] == "last" and best["drop"] == max(last["p_true_drop"])
    text = contamination_markdown(c)
    full = -c["damage"]["p_true_change"]["value"]
    assert f"the full edit lowers mean P(true) by {100 * full:.2f} [" in text
    assert f"MLP (mlp_out) at most {100 * best['drop']:.2f} [{100 * best['ci95'][0]:.2f}, " in text
    assert "By log-odds: the full edit lowers log-odds(true vs new) by" in text
    assert "by P(true) MLP (MLP" in text and "the paper's order by P(true)" in text  # MLP's drop is made larger
    assert f"-{PAPER['mlp_out']}% (MLP), -{PAPER['attn_out']}% (attention)" in text
    assert "means only" not in text and "not comparable" not in text


def test_attention_ahead_by_p_true_is_called_the_reverse_of_the_paper():
    c = _report(mlp_drop=0.1, attn_drop=0.4)["contamination"]
    text = contamination_markdown(c)
    assert "by P(true) attention (MLP" in text and "the reverse of the paper's order by P(true)" in text


def test_a_file_without_per_window_p_true_intervals_says_means_only():
    c = _report()["contamination"]
    for entry in c["damage"]["components"].values():
        for e in entry["by_position"].values():
            del e["p_true_drop"], e["p_true_drop_ci95"]
    p_true = contamination_p_true(c)
    assert p_true["attn_out"]["best"]["ci95"] is None
    assert p_true["attn_out"]["best"]["drop"] == pytest.approx(
        max(max(v) for v in c["components"]["attn_out"]["mean_drop_by_position"].values()))
    text = contamination_markdown(c)
    assert "means only" in text and "so an order this close is not established" in text


def test_contamination_figure_shows_p_true_drop_beside_log_odds():
    result = _report()
    fig = contamination_figure(result)
    axes = {fig.layout.yaxis.title.text, fig.layout.yaxis2.title.text}
    assert axes == {"log-odds damage (share of the edit's)", "P(true) drop (points)"}
    right = [t for t in fig.data if t.xaxis == "x2" and t.mode == "lines+markers"]
    p_true = contamination_p_true(result["contamination"])
    drawn = {t.name: t for t in right}
    assert list(drawn["mlp_out @ last"].y) == pytest.approx([100 * x for x in p_true["mlp_out"]["by_position"]["last"]["drop"]])
    assert sum(t.fill == "toself" for t in fig.data) == 2 * 2 * 3  # both panels draw every curve's CI band
    for line in fig.layout.title.text.split("<br>"):
        assert len(line) * 8 <= fig.layout.width - 150, line  # the title fits the figure
    assert contamination_figure({"contamination": {}}) is None
