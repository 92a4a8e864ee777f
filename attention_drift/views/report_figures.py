"""The figures of the drift and patch reports, drawn from their JSON content (``drift.json``,
``patch.json``) so a committed report redraws without re-running anything."""

import math
import sys
from pathlib import Path

import torch

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


def drift_figures(result: dict, out: Path, png: bool) -> list[str]:
    """The drift report's figures from ``drift.json``'s content into ``out`` (the per-head drift
    heatmap, drift vs failure), as HTML and, with ``png``, PNG; returns the files written."""
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
    return written


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
    damage = result.get("contamination", {}).get("damage")
    if damage:
        curves, bands = {}, {}
        for comp, c in damage["components"].items():
            for label, e in c["by_position"].items():
                name = f"{comp} @ {label}"
                curves[name] = torch.tensor(e["share"], dtype=torch.float64)
                bands[name] = tuple(torch.tensor(e["share_ci95"], dtype=torch.float64).unbind(-1))
        if curves:
            fig = plots.recovery_curves(
                curves, f"Contamination: share of the edit's log-odds drop reproduced (95% CI), "
                f"{result['contamination'].get('window') or '?'}-layer windows · {damage['n_prompts']} prompts, "
                f"{damage['n_records']} records", ci=bands, xlabel="window centre layer",
                ylabel="log-odds damage (share of the edit's)")
            written += plots.save_figure(fig, out / "patch_contamination", png)
    return written
