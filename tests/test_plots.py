import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from attention_drift.views import plots
from attention_drift.views.plots import (
    PlotError,
    PngExportError,
    bars_from_summaries,
    drift_heatmap,
    drift_vs_failure,
    drift_vs_failure_panels,
    metric_bars,
    patching_heatmap,
    png_export_problem,
    recovery_curves,
    save,
    tradeoff_curve,
)

from attention_drift.reports.stats import pearson, spearman

PNG_PROBLEM = png_export_problem()


def _drift_inputs():
    before = torch.rand(3, 4)
    after = before + torch.randn(3, 4) * 0.1
    return before, after


def test_drift_heatmap_delta_values_and_hover():
    before, after = _drift_inputs()
    fig = drift_heatmap(before, after, title="drift")
    (trace,) = fig.data
    assert isinstance(trace, go.Heatmap)
    np.testing.assert_allclose(np.array(trace.z), (after - before).numpy(), rtol=1e-6, atol=1e-7)
    custom = np.array(trace.customdata)
    assert custom.shape == (3, 4, 3)
    np.testing.assert_allclose(custom[..., 0], before.numpy(), rtol=1e-6)
    np.testing.assert_allclose(custom[..., 1], after.numpy(), rtol=1e-6)
    for word in ("layer", "head", "before", "after", "drift"):
        assert word in trace.hovertemplate
    assert "KL" not in trace.hovertemplate
    assert trace.zmid == 0
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.title.text == "drift"
    assert fig.layout.template.layout.paper_bgcolor == "white"


def test_drift_heatmap_after_and_kl():
    before, after = _drift_inputs()
    kl = (after - before).abs()
    fig = drift_heatmap(before, after, value="after", kl=kl)
    np.testing.assert_allclose(np.array(fig.data[0].z), after.numpy(), rtol=1e-6)
    assert "KL" in fig.data[0].hovertemplate
    np.testing.assert_allclose(np.array(fig.data[0].customdata)[..., 3], kl.numpy(), rtol=1e-6)
    fig = drift_heatmap(before, after, value="kl", kl=kl)
    np.testing.assert_allclose(np.array(fig.data[0].z), kl.numpy(), rtol=1e-6)
    assert fig.data[0].zmid is None


def test_drift_heatmap_bad_value():
    before, after = _drift_inputs()
    with pytest.raises(PlotError, match="kl="):
        drift_heatmap(before, after, value="kl")
    with pytest.raises(PlotError, match="value must be one of"):
        drift_heatmap(before, after, value="ratio")


def test_patching_heatmap_keeps_repeated_token_rows():
    recovery = torch.tensor([[0.1, -0.2], [0.3, float("nan")], [0.5, 0.6]])
    tokens = [" the", "<bos>", " the"]
    fig = patching_heatmap(recovery, tokens, ["L0", "L1"], "contamination",
                           row_title="position", col_title="layer", value_name="ΔP")
    (trace,) = fig.data
    assert trace.z[1][1] is None
    assert trace.z[0] == pytest.approx([0.1, -0.2]) and trace.z[2] == pytest.approx([0.5, 0.6])
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 2]
    assert list(fig.layout.yaxis.ticktext) == ["&nbsp;the", "&lt;bos&gt;", "&nbsp;the"]
    assert trace.customdata[2][0][0] == "&nbsp;the" and trace.customdata[2][0][1] == "L0"
    assert "ΔP" in trace.hovertemplate and "position" in trace.hovertemplate
    assert trace.zmid == 0
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "position"


def test_patching_heatmap_label_mismatch():
    with pytest.raises(PlotError, match="2 row labels"):
        patching_heatmap(torch.zeros(3, 2), ["a", "b"], ["x", "y"], "t")


def test_recovery_curves_lines_and_bands():
    attn, mlp = torch.tensor([0.0, 0.5, 0.2]), torch.tensor([0.1, 0.1, 0.9])
    ci = {"attn": (attn - 0.1, attn + 0.1)}
    fig = recovery_curves({"attn": attn, "mlp": mlp}, "rec", ci=ci)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert [t.name for t in lines] == ["attn", "mlp"]
    assert list(lines[0].x) == [0, 1, 2] and list(lines[1].y) == pytest.approx([0.1, 0.1, 0.9])
    assert len(bands) == 1
    assert list(bands[0].y) == pytest.approx([0.1, 0.6, 0.3, 0.1, 0.4, -0.1])
    assert fig.layout.xaxis.title.text == "layer"


def test_recovery_curves_bad_ci():
    with pytest.raises(PlotError, match="not in recovery"):
        recovery_curves({"attn": torch.zeros(3)}, ci={"mlp": (torch.zeros(3), torch.zeros(3))})
    with pytest.raises(PlotError, match="x has 2"):
        recovery_curves({"attn": torch.zeros(3)}, x=[0, 1])


def test_drift_vs_failure_bins_and_correlation():
    drift = torch.arange(10, dtype=torch.float32).flip(0)
    failure = 2 * drift + 1
    fig = drift_vs_failure(drift, failure, bins=2)
    points, curve = fig.data
    assert len(points.x) == 10
    assert list(curve.x) == pytest.approx([2.0, 7.0])
    assert list(curve.y) == pytest.approx([5.0, 15.0])
    sem = 1.96 * float(torch.tensor([1.0, 3, 5, 7, 9]).std()) / math.sqrt(5)
    assert list(curve.error_y.array) == pytest.approx([sem, sem])
    text = fig.layout.annotations[0].text
    assert "Pearson r = 1.000" in text and "Spearman ρ = 1.000" in text and "n = 10 cases" in text
    wavy = failure + torch.tensor([0.0, 9, -9, 4, -4, 1, -1, 0, 3, -3])
    p, s = pearson(drift, wavy), spearman(drift, wavy)
    text = drift_vs_failure(drift, wavy, bins=2).layout.annotations[0].text
    assert f"Pearson r = {p.r:.3f} [{p.ci_low:.2f}, {p.ci_high:.2f}], p = {p.p_value:.2g}" in text
    assert f"Spearman ρ = {s.r:.3f} [{s.ci_low:.2f}, {s.ci_high:.2f}]" in text
    given = {"method": "spearman", "r": 0.49, "ci_low": 0.2, "ci_high": 0.7, "p_value": 1e-6, "n": 10}
    auc = {"value": 0.61, "ci_low": 0.52, "ci_high": 0.7, "method": "cluster bootstrap"}
    fig = drift_vs_failure(drift, failure, bins=3, correlations=[given], auroc=auc, n_records=4,
                           failed=[True] * 3 + [False] * 7, ylabel="log-odds drop", note="prompts right before")
    text = fig.layout.annotations[0].text
    assert "Spearman ρ = 0.490 [0.20, 0.70], p = 1e-06 (vs log-odds drop)" in text and "Pearson" not in text
    assert "AUROC = 0.610 [0.52, 0.70] (cluster bootstrap) for failure" in text
    assert "n = 10 cases, 4 records" in text and "prompts right before" in text
    held, failed, curve = fig.data
    assert (len(held.x), len(failed.x)) == (7, 3) and failed.name == "failed"
    assert list(curve.customdata) == [4, 3, 3]


def test_drift_vs_failure_panels_side_by_side():
    x = torch.linspace(0, 1, 8)
    panels = [{"drift": x, "failure": x, "xlabel": "max drift"}, {"drift": x, "failure": -x, "xlabel": "max KL"}]
    fig = drift_vs_failure_panels(panels, ylabel="log-odds drop")
    assert [a.xref for a in fig.layout.annotations] == ["x domain", "x2 domain"]
    assert "Pearson r = -1.000" in fig.layout.annotations[1].text
    assert fig.layout.xaxis.title.text == "max drift" and fig.layout.xaxis2.title.text == "max KL"
    assert sum(t.showlegend is not False for t in fig.data) == 2  # one legend entry per trace kind
    with pytest.raises(PlotError, match="at least one panel"):
        drift_vs_failure_panels([])
    with pytest.raises(PlotError, match="method"):
        drift_vs_failure(x, x, bins=2, correlations=[{"r": 0.1}])
    with pytest.raises(PlotError, match="failed has 3"):
        drift_vs_failure(x, x, bins=2, failed=[True] * 3)


def test_drift_vs_failure_rejects_bad_input():
    with pytest.raises(PlotError, match="non-finite"):
        drift_vs_failure(torch.tensor([0.1, float("nan"), 0.3]), torch.zeros(3))
    with pytest.raises(PlotError, match="bins"):
        drift_vs_failure(torch.zeros(3), torch.zeros(3), bins=4)


def _summary(pre, post=None):
    groups = {}
    for group, acc in pre.items():
        groups[group] = {"pre": {"accuracy": acc, "ci95": [acc - 0.05, acc + 0.05], "n": 100}}
        if post is not None:
            groups[group]["post"] = {"accuracy": post[group], "ci95": [post[group] - 0.1, post[group] + 0.02], "n": 100}
    groups["fluency"] = {"pre": {"ngram_entropy": 6.1, "n": 10}}
    return {"groups": groups, "meta": {"model": "m", "method": "rome"}}


def test_bars_from_summaries_and_metric_bars():
    rome = _summary({"efficacy": 0.2, "relation": 0.8}, {"efficacy": 1.0, "relation": 0.1})
    sadr = _summary({"efficacy": 0.21, "relation": 0.79}, {"efficacy": 0.98, "relation": 0.3})
    bars = bars_from_summaries({"ROME": rome, "ROME+SADR": sadr})
    assert list(bars) == ["pre-edit", "ROME", "ROME+SADR"]
    assert bars["pre-edit"]["efficacy"]["accuracy"] == 0.2
    assert bars["ROME+SADR"]["relation"]["accuracy"] == 0.3
    assert "fluency" not in bars["pre-edit"]

    fig = metric_bars(bars, "metrics")
    assert [t.name for t in fig.data] == ["pre-edit", "ROME", "ROME+SADR"]
    assert all(isinstance(t, go.Bar) for t in fig.data)
    rome_bar = fig.data[1]
    assert list(rome_bar.x) == ["efficacy", "relation"]
    assert list(rome_bar.y) == pytest.approx([100.0, 10.0])
    assert list(rome_bar.error_y.array) == pytest.approx([2.0, 2.0])
    assert list(rome_bar.error_y.arrayminus) == pytest.approx([10.0, 10.0])
    assert fig.layout.barmode == "group"
    assert fig.layout.yaxis.title.text == "accuracy (%)"


def test_metric_bars_half_width_and_gaps():
    summary = {"A": {"efficacy": {"accuracy": 0.5, "ci95": 0.1}}, "B": {"relation": {"accuracy": 0.4}}}
    fig = metric_bars(summary, percent=False)
    assert list(fig.data[0].y) == [0.5, None]
    assert list(fig.data[0].error_y.array)[0] == pytest.approx(0.1)
    assert list(fig.data[1].y) == [None, 0.4]


def test_metric_dots_is_a_panel_per_metric_and_a_row_per_setting():
    summary = {"pre-edit": {"efficacy": {"accuracy": 0.2, "ci95": [0.1, 0.3]}},
               "rome": {"efficacy": {"accuracy": 0.9, "ci95": 0.05}, "relation": {"accuracy": 0.4, "ci95": [0.3, 0.5]}},
               "rome-sadr": {"efficacy": {"accuracy": 1.0, "ci95": [0.97, 1.0]}, "relation": {"accuracy": None}}}
    kind = {"pre-edit": "unedited", "rome": "alone", "rome-sadr": "with SADR"}
    fig = plots.metric_dots(summary, "t", metrics=["efficacy", "relation"], series=kind.get)
    assert [a.text for a in fig.layout.annotations][:2] == ["efficacy", "relation"]
    by_panel = {}
    for trace in fig.data:
        by_panel.setdefault(trace.xaxis, []).append((trace.name, list(trace.y), list(trace.x)))
    assert by_panel["x"] == [("unedited", ["pre-edit"], [pytest.approx(20.0)]), ("alone", ["rome"], [pytest.approx(90.0)]),
                             ("with SADR", ["rome-sadr"], [pytest.approx(100.0)])]
    assert by_panel["x2"] == [("alone", ["rome"], [pytest.approx(40.0)])]  # a missing accuracy is no row
    rome = next(t for t in fig.data if t.name == "alone" and t.xaxis == "x")
    assert list(rome.error_x.array) == pytest.approx([5.0]) and list(rome.error_x.arrayminus) == pytest.approx([5.0])
    assert [t.name for t in fig.data if t.showlegend] == ["unedited", "alone", "with SADR"]


def test_bars_from_summaries_rejects_other_json():
    with pytest.raises(PlotError, match="summarize"):
        bars_from_summaries({"x": {"rows": []}})


def test_tradeoff_curve():
    fig = tradeoff_curve([0.001, 0.01, 0.1], {"efficacy": [1.0, 0.99, 0.9], "DNS": [0.3, 0.4, 0.5]},
                         "γ", "trade-off", log_x=True)
    assert fig.layout.xaxis.type == "log"
    assert [t.name for t in fig.data] == ["efficacy", "DNS"]
    assert list(fig.data[1].y) == [0.3, 0.4, 0.5]
    assert fig.layout.xaxis.title.text == "γ"
    two_lines = tradeoff_curve([0.1, 1.0], {"e": [1, 1]}, "γ", "a <b>\n30 records")
    assert two_lines.layout.title.text == "a &lt;b&gt;<br>30 records"  # a line break, the text still escaped
    with pytest.raises(PlotError, match="positive"):
        tradeoff_curve([0.0, 0.1], {"e": [1, 1]}, "γ", "t", log_x=True)
    with pytest.raises(PlotError, match="has 1 values"):
        tradeoff_curve([0.0, 0.1], {"e": [1]}, "γ", "t")


def test_tradeoff_curve_on_categories_with_intervals():
    """γ = 0 sits on the axis as a labelled category (no fake position on a log scale), with CI whiskers."""
    labels = ["0 (ROME)", "0.01 (published)", "0.1", "1"]
    fig = tradeoff_curve(labels, {"DNS": [20, 30, 31, 32], "PS": [97, 93, 92, 83]},
                         ci={"DNS": [[15, 26], [24, 36], 6.0, [25, 38]]})
    assert fig.layout.xaxis.type == "category"  # "0.1" and "1" stay labels, evenly spaced, in the given order
    dns, ps = fig.data
    assert list(dns.x) == labels
    assert list(dns.error_y.array) == pytest.approx([6, 6, 6, 6]) and list(dns.error_y.arrayminus) == [5, 6, 6, 7]
    assert ps.error_y.array is None  # no interval given: none drawn
    with pytest.raises(PlotError, match="log_x"):
        tradeoff_curve(labels, {"DNS": [1, 2, 3, 4]}, log_x=True)
    with pytest.raises(PlotError, match="intervals but xs has 4"):
        tradeoff_curve(labels, {"DNS": [1, 2, 3, 4]}, ci={"DNS": [1.0]})
    with pytest.raises(PlotError, match="not in series"):
        tradeoff_curve(labels, {"DNS": [1, 2, 3, 4]}, ci={"PS": [1.0] * 4})


def test_save_html_is_self_contained(tmp_path):
    before, after = _drift_inputs()
    (path,) = save(drift_heatmap(before, after), tmp_path / "sub" / "drift.html")
    assert path == tmp_path / "sub" / "drift.html"
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size > 1_000_000
    assert re.findall(r"<script[^>]*>", text) == ["<script>"] * len(re.findall(r"<script[^>]*>", text))
    assert "plotly.js v" in text and "Plotly.newPlot" in text


def test_save_static_without_browser_raises_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(PngExportError, match="apt-get install -y chromium"):
        save(go.Figure(), tmp_path / "fig")
    assert list(tmp_path.iterdir()) == []
    before, after = _drift_inputs()
    assert save(drift_heatmap(before, after), tmp_path / "ok.html")[0].exists()


def test_save_static_without_kaleido_says_how_to_install(tmp_path, monkeypatch):
    def missing(name):
        raise plots.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(plots.importlib.metadata, "version", missing)
    with pytest.raises(PngExportError, match="kaleido>=1"):
        save(go.Figure(), tmp_path / "fig.png")


@pytest.mark.skipif(PNG_PROBLEM is not None, reason=f"PNG export unavailable: {PNG_PROBLEM}")
def test_save_html_and_png_without_suffix(tmp_path):
    before, after = _drift_inputs()
    paths = save(drift_heatmap(before, after), tmp_path / "gamma-0.01", scale=1)
    assert paths == [tmp_path / "gamma-0.01.html", tmp_path / "gamma-0.01.png"]
    png = paths[1].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (700, 450)


def test_recovery_tradeoff_marks_every_variant_with_its_intervals():
    from attention_drift.views.plots import recovery_tradeoff

    points = {"tuning half": [{"variant": "a", "n_records": 12, "recovered": 0.5, "recovered_ci95": [0.3, 0.7],
                               "cost_diff": -0.02, "cost_ci95": [-0.05, 0.0], "efficacy": 1.0},
                              {"variant": "b", "n_records": 12, "recovered": 0.8, "recovered_ci95": None,
                               "cost_diff": -0.1, "cost_ci95": None, "efficacy": 0.9}]}
    fig = recovery_tradeoff(points)
    a, b = fig.data
    assert (list(a.x), list(a.y), list(b.x), list(b.y)) == ([-2.0], [50.0], [-10.0], [80.0])
    assert list(a.error_y.array) == pytest.approx([20.0]) and list(b.error_y.array) == [0.0]
    assert list(a.error_x.arrayminus) == pytest.approx([3.0])
    # every marker carries its number; the legend is the key, grouped by series
    assert (list(a.text), list(b.text)) == (["1"], ["2"])
    assert a.name == "1  a (12 records)" and a.legendgrouptitle.text == "tuning half" and a.mode == "markers+text"
    with pytest.raises(PlotError, match="at least one point"):
        recovery_tradeoff({"x": []})


def test_label_positions_keep_numbers_apart():
    from attention_drift.views.plots import LABEL_SPOTS, label_positions

    # three points almost on top of each other, one far away
    spots = label_positions([(0.0, 90.0), (0.0, 92.0), (0.0, 88.0), (50.0, 0.0)], (-10.0, 60.0), (-60.0, 170.0))
    assert spots[3] == next(iter(LABEL_SPOTS))  # alone: the first spot
    assert len(set(spots[:3])) == 3  # crowded: three different spots
    w, h = 0.02, 0.04

    def box(i, spot):
        x, y = [(0.0, 90.0), (0.0, 92.0), (0.0, 88.0)][i]
        dx, dy = LABEL_SPOTS[spot]
        return (x + 10) / 70 + dx * w, (y + 60) / 230 + dy * h

    boxes = [box(i, s) for i, s in enumerate(spots[:3])]
    assert all(abs(p[0] - q[0]) >= w or abs(p[1] - q[1]) >= h for i, p in enumerate(boxes) for q in boxes[i + 1:])


def test_heatmaps_show_intervals_in_the_hover():
    before, after = torch.zeros(2, 3), torch.full((2, 3), 0.2)
    low, high = torch.full((2, 3), 0.1), torch.full((2, 3), 0.3)
    fig = drift_heatmap(before, after, drift_ci=(low, high))
    assert "drift 95% CI low" in fig.data[0].hovertemplate
    assert fig.data[0].customdata[1][2][3:5] == pytest.approx((0.1, 0.3))
    from jaxtyping import TypeCheckError

    with pytest.raises((PlotError, TypeCheckError), match="drift_ci"):  # the shape hints catch it first under beartype
        drift_heatmap(before, after, drift_ci=(low.T, high.T))
    fig = patching_heatmap(after, [0, 1], ["a", "b", "c"], ci=(low, high))
    assert "95% CI: [%{customdata[2]}, %{customdata[3]}]" in fig.data[0].hovertemplate
    assert list(fig.data[0].customdata[0][1][2:]) == ["0.1", "0.3"]
