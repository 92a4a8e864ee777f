"""The figures of the drift and patch reports, drawn from their JSON content (``drift.json``,
``patch.json``) so a committed report redraws without re-running anything."""

import html
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go
import torch

from attention_drift.reports.drift_failure import MEASURE_LABELS, failure_links, max_vs_sum
from attention_drift.reports.patch import variant_label
from attention_drift.reports.stats import distinct_records
from attention_drift.views import plots

FIGURE_FACTORS = {"max_drift_subject_last": "max over heads of the drift of attention to the subject's last token",
                  "max_kl": "max over heads of KL(before ‖ after) of the attention row"}
"""The factors of the drift-vs-failure figure, side by side: attention mass and KL."""


def drift_failure_figure(result: dict, factors: dict[str, str] = FIGURE_FACTORS):
    """The drift-vs-failure figure of a ``drift.json`` content (:meth:`DriftReport.to_dict`): one
    panel per factor (default: the attention-mass factor beside the KL factor), the log-odds
    drop of every prompt right before the edit (failed ones coloured), binned means with 95%
    CIs, Pearson and Spearman with the log-odds drop (95% CIs), the AUROC for failure (95% CI)
    and n. None when fewer than 2 such prompts have finite values."""

    failure = result["failure"]["all"]
    panels = []
    for factor, label in factors.items():
        kept = [s for s in result["samples"] if s["right_before"] and math.isfinite(s["factors"][factor])
                and math.isfinite(s["severity"]["logodds_drop"])]
        if len(kept) < 2:
            continue
        c = result["correlations_right_before"]["all"][factor]["logodds_drop"]
        panels.append({
            "drift": torch.tensor([s["factors"][factor] for s in kept]),
            "failure": torch.tensor([s["severity"]["logodds_drop"] for s in kept]),
            "failed": [s["flipped"] for s in kept], "bins": min(8, len(kept)),
            "correlations": [c["pearson"], c["spearman"]], "auroc": result["auroc_right_before"]["all"][factor],
            "n_records": distinct_records(s["case_id"] for s in kept), "xlabel": f"{factor}: {label}"})
    if not panels:
        return None
    return plots.drift_vs_failure_panels(panels, ylabel="log-odds(true vs new) drop", title=(
        f"Drift vs failure · {failure['n_kept']} prompts right before the edit, {failure['n_records_kept']} records "
        f"({failure['n_excluded_wrong_before']} wrong before the edit excluded)"))


LINKS_WIDTH = 1200
"""Width of the :func:`drift_failure_links` figure, in pixels."""


def drift_failure_links(result: dict, coefficient: str = "pearson"):
    """The forest plot of a ``drift.json`` content's ``"failure_links"`` (computed from its
    samples when absent): per failure measure (one panel each: pass/fail, log-odds drop, P(true)
    drop), the ``coefficient`` (``"pearson"`` or ``"spearman"``) of every factor in every group
    with its record-clustered bootstrap 95% CI, over the prompts right before the edit. The
    title gives the prompts / records per group and the paired max-vs-sum verdict on all
    prompts (``"max_vs_sum"``); hover gives n, the Student-t and the bootstrap p. None when no
    group has prompts right before the edit."""
    links = result.get("failure_links") or failure_links(result["samples"], result.get("groups"))
    paired = result.get("max_vs_sum") or max_vs_sum(result["samples"], result.get("groups"))
    groups = {g: v for g, v in links["groups"].items() if v["n_prompts"]}
    if not groups:
        return None
    series = {g: f"{g} ({v['n_prompts']} prompts / {v['n_records']} records)" for g, v in groups.items()}
    symbol = {"pearson": "Pearson r", "spearman": "Spearman ρ"}[coefficient]
    panels = {}
    for measure in links["measures"]:
        rows = []
        for factor in next(iter(groups.values()))["factors"]:
            for group, g in groups.items():
                e = g["factors"][factor][measure][coefficient]
                rows.append({"label": f"{factor}\n{group}", "value": e["value"], "ci_low": e["ci_low"],
                             "ci_high": e["ci_high"], "series": series[group],
                             "hover": f"n = {e['n']} prompts, {e['n_clusters']} records\nStudent-t p = "
                                      f"{e['p_value']:.2g}, bootstrap p = {e['p_bootstrap']:.2g}"})
        biserial = " (point-biserial)" if measure == "failure" and coefficient == "pearson" else ""
        panels[f"{symbol} vs {MEASURE_LABELS[measure]}{biserial}"] = rows
    st = links["settings"]
    sizes = ", ".join(f"{g} {v['n_prompts']} / {v['n_records']}" for g, v in groups.items())
    head = (f"Drift vs three failure measures · {symbol} with record-clustered bootstrap 95% CI ({st['n_boot']} "
            f"draws of records), prompts right before the edit; prompts / records: {sizes}")
    everyone = paired["groups"].get("all", {})
    head += (f". Paired record-clustered test of {paired['a']} − {paired['b']} (all prompts; CIs in figures.md): "
             f"{everyone.get('verdict', 'not testable')}")
    fig = plots.forest(panels, title=head, xlabel=symbol, width=LINKS_WIDTH)
    fig.update_xaxes(dtick=0.2)
    return fig


def drift_figures(result: dict, out: Path, png: bool) -> list[str]:
    """The drift report's figures from ``drift.json``'s content into ``out`` (the per-head drift
    heatmap, drift vs failure, the forest plot of drift vs the three failure measures), as HTML
    and, with ``png``, PNG; returns the files written."""
    written = []
    before = torch.tensor(result["subject_last_attention"]["before"])
    after = torch.tensor(result["subject_last_attention"]["after"])
    stats = result["head_stats"]["delta_subject_last"]
    mean, sem = torch.tensor(stats["mean"]), torch.tensor(stats["sem"])
    kl = torch.tensor(result["head_stats"]["kl"]["mean"])
    fig = plots.drift_heatmap(before, after, kl=kl, drift_ci=(mean - 1.96 * sem, mean + 1.96 * sem), title=(
        f"Drift of attention to the edited subject · {result['n_samples']} prompts, "
        f"{result['records']} records (hover: 95% CI of each head's mean drift)"))
    written += plots.save_figure(fig, out / "drift_heatmap", png)
    fig = drift_failure_figure(result)
    if fig is None:
        print(f"attention-drift: no drift_vs_failure figure: {result['failure']['all']['n_kept']} prompt(s) right "
              "before the edit, 2 needed", file=sys.stderr)
    else:
        written += plots.save_figure(fig, out / "drift_vs_failure", png)
    fig = drift_failure_links(result)
    if fig is not None:
        written += plots.save_figure(fig, out / "drift_failure_links", png)
    return written


EDITOR_PANEL_COLUMNS = 4
"""Panels per row of :func:`editor_drift_heatmaps`."""


def editor_drift_heatmaps(reports: Mapping[str, Mapping]) -> go.Figure:
    """One layer x head heatmap per editor of the mean drift of attention to the edited subject's
    last token (``head_stats["delta_subject_last"]["mean"]``), from ``{editor: drift.json content}``.

    Every panel shares one diverging colour scale centred at 0 (one colour axis, ± the largest
    absolute mean drift of any panel), so a colour means the same drift in every editor's panel;
    each panel's title gives its editor and the records / prompts its report counts. Raises
    :class:`~attention_drift.views.plots.PlotError` for no reports or reports of models with
    different numbers of layers or heads."""
    from plotly.subplots import make_subplots

    if not reports:
        raise plots.PlotError("no drift reports: give {editor: drift.json content}, at least one")
    means = {name: torch.tensor(r["head_stats"]["delta_subject_last"]["mean"], dtype=torch.float64)
             for name, r in reports.items()}
    shapes = {name: tuple(m.shape) for name, m in means.items()}
    if len(set(shapes.values())) > 1 or any(len(s) != 2 for s in shapes.values()):
        raise plots.PlotError(f"the reports' (layers, heads) differ: {shapes}; compare editors of one model")
    layers, heads = next(iter(shapes.values()))
    finite = torch.cat([m[m.isfinite()] for m in means.values()])
    limit = float(finite.abs().max()) if finite.numel() and finite.abs().max() > 0 else 1.0
    cols = min(EDITOR_PANEL_COLUMNS, len(reports))
    rows = math.ceil(len(reports) / cols)
    titles = [f"{name} · {r['records']} records / {r['n_samples']} prompts" for name, r in reports.items()]
    width, height = 120 + cols * max(250, 24 * heads), 120 + rows * max(320, 14 * layers + 60)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=70 / height)
    for i, (name, mean) in enumerate(means.items()):
        z = [[v if math.isfinite(v) else None for v in row] for row in mean.tolist()]
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(heads)), y=list(range(layers)), coloraxis="coloraxis", hoverongaps=False,
            hovertemplate=f"{html.escape(name)}<br>layer %{{y}}, head %{{x}}<br>mean drift: %{{z:.4g}}"
                          "<extra></extra>"), row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(coloraxis={"colorscale": plots.DIVERGING, "cmin": -limit, "cmax": limit,
                                 "colorbar": {"title": "mean<br>drift"}}, width=width, height=height)
    fig.update_annotations(font_size=12)
    plots.style(fig, "Mean drift of attention to the edited subject's last token per head, by editor "
                f"(after − before, one colour scale: ±{limit:.3g})", "", "")
    fig.update_yaxes(autorange="reversed", dtick=1 if layers <= 12 else 5)
    fig.update_yaxes(title_text="layer", col=1)
    fig.update_xaxes(dtick=1 if heads <= 12 else 4)
    fig.update_xaxes(title_text="head", row=rows)
    return fig


SANITY_CHECKS = ("attn_out_all", "mlp_out_all")
"""Restoration variants that give back the pre-edit prediction by construction (every MLP output, or
every attention output, at every layer and position): checks of the patching, drawn apart from
the results."""


def patch_accuracy_figure(result: dict):
    """The restoration figure of a ``patch.json`` content: accuracy on the distract prompts and the
    pooled share of the log-odds gap recovered (95% CIs) per restoration variant, beside a panel of
    the :data:`SANITY_CHECKS` (with pre-edit for reference)."""
    n = f"{result['n_prompts']} prompts, {result['records']} records"

    def recovery(s):
        ci = s.get("recovery_pooled_ci95") or [None, None]
        value = s.get("recovery_pooled")
        return {"accuracy": value, "ci95": None if ci[0] is None or value is None else ci}

    accuracy = "accuracy on the distract prompts"
    bars = {"pre-edit": {accuracy: result["pre"], "log-odds gap recovered": recovery(result["pre"])}}
    checks = {}
    for name, s in result["variants"].items():
        (checks if name in SANITY_CHECKS else bars)[variant_label(name, s)] = {
            accuracy: s, "log-odds gap recovered": recovery(s)}
    panels = {"restoring pre-edit activations": bars}
    if checks:
        panels["sanity checks: ≈100% by construction"] = {"pre-edit": bars["pre-edit"], **checks}
    fig = plots.metric_bar_panels(panels, f"Restoring pre-edit activations · {n} (95% CIs)", ylabel="%")
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0}, height=760, width=900)
    return plots.fit_title(fig)


def patch_figures(result: dict, out: Path, png: bool) -> list[str]:
    """The patch report's figures from ``patch.json``'s content into ``out`` (restoration accuracy,
    the layer x component sweep, the windows, contamination), as HTML and, with ``png``, PNG;
    returns the files written."""
    written = plots.save_figure(patch_accuracy_figure(result), out / "patch_accuracy", png)
    if "sweep" in result:
        s = result["sweep"]
        rec = torch.tensor(s["recovery_pooled"], dtype=torch.float64)
        ci = s.get("recovery_pooled_ci95")
        fig = plots.patching_heatmap(
            rec, list(range(rec.shape[0])), s["components"],
            f"Restoration per layer · pooled log-odds recovery, {s['n_prompts']} prompts, "
            f"{s.get('n_records', '?')} records (hover: 95% CI)",
            ci=None if ci is None else tuple(torch.tensor(ci, dtype=torch.float64).unbind(-1)))
        written += plots.save_figure(fig, out / "patch_layer_component", png)
    if "windows" in result:
        w = result["windows"]
        label = "attention patterns, 10-layer window"
        ci = w.get("recovery_pooled_ci95")
        fig = plots.recovery_curves(
            {label: torch.tensor(w["recovery_pooled"], dtype=torch.float64)},
            f"Restoring attention patterns, sliding windows · pooled log-odds recovery (95% CI), "
            f"{w['n_prompts']} prompts, {w.get('n_records', '?')} records",
            ci=None if ci is None else {label: tuple(torch.tensor(ci, dtype=torch.float64).unbind(-1))},
            xlabel="window centre layer")
        written += plots.save_figure(fig, out / "patch_windows", png)
    fig = contamination_figure(result)
    if fig is not None:
        written += plots.save_figure(fig, out / "patch_contamination", png)
    return written


CONTAMINATION_WIDTH = 1000
"""The contamination figure's width in px; its title wraps at about 8 px a character (title font)."""


def contamination_figure(result: dict):
    """The contamination of a ``patch.json`` content, two panels over the window centre layer, one
    curve per component and key position with its 95% CI band: the share of the edit's log-odds
    drop that substituting the edited outputs reproduces (left), and the mean P(true) drop in
    points (right; bands where the file stores intervals, see
    :func:`attention_drift.reports.patch.contamination_p_true`) with the full edit's own P(true)
    drop and its CI as a line and a band. None without ``damage``."""
    import textwrap

    from plotly.subplots import make_subplots

    from attention_drift.reports.patch import contamination_p_true

    c = result.get("contamination", {})
    damage = c.get("damage")
    if not damage:
        return None
    left, right, left_ci, right_ci = {}, {}, {}, {}
    p_true = contamination_p_true(c)
    for comp, entry in damage["components"].items():
        for label, e in entry["by_position"].items():
            name = f"{comp} @ {label}"
            left[name] = torch.tensor(e["share"], dtype=torch.float64)
            left_ci[name] = tuple(torch.tensor(e["share_ci95"], dtype=torch.float64).unbind(-1))
            drop = p_true[comp]["by_position"].get(label)
            if drop is not None:
                right[name] = 100 * torch.tensor(drop["drop"], dtype=torch.float64)
                if drop["ci95"] is not None:
                    right_ci[name] = tuple((100 * torch.tensor(drop["ci95"], dtype=torch.float64)).unbind(-1))
    if not left:
        return None
    window = c.get("window") or "?"
    change = damage["p_true_change"]
    full, low, high = (-100 * change[k] for k in ("value", "ci_high", "ci_low"))
    panels = (plots.recovery_curves(left, "", ci=left_ci), plots.recovery_curves(right, "", ci=right_ci))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.09, subplot_titles=(
        "log-odds damage (share of the edit's drop)",
        "P(true) drop, points" + ("" if right_ci else " (means only: no CIs stored)")))
    for col, panel in enumerate(panels, start=1):
        for trace in panel.data:
            trace.showlegend = col == 1 and trace.showlegend is not False
            fig.add_trace(trace, row=1, col=col)
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "grey"}, annotation_text="full edit", row=1, col=1)
    fig.add_hrect(y0=low, y1=high, fillcolor="grey", opacity=0.12, line_width=0, row=1, col=2)
    fig.add_hline(y=full, line={"dash": "dot", "color": "grey"}, row=1, col=2,
                  annotation_text=f"full edit {full:.2f} [{low:.2f}, {high:.2f}]")
    title = (f"Contamination: edited outputs substituted over {window}-layer windows, by log-odds damage and by P(true) "
             f"drop (95% CI) · {damage['n_prompts']} prompts, {damage['n_records']} records")
    fig = plots.style(fig, "\n".join(textwrap.wrap(title, (CONTAMINATION_WIDTH - 200) // 8)),
                      "window centre layer", "log-odds damage (share of the edit's)")
    fig.update_xaxes(title_text="window centre layer")
    fig.update_yaxes(title_text="P(true) drop (points)", row=1, col=2)
    fig.update_layout(width=CONTAMINATION_WIDTH, height=600, margin={"t": 150},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    return fig

