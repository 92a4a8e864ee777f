"""The patch report: what restoring or substituting activations does, over records.

:func:`patch_from_lines` rebuilds ``patch.json`` (a :class:`PatchReport`) from the per-record lines
of :func:`~attention_drift.measure.patch_record.patch_record`: per restoration variant, mean P(true),
mean log-odds(true vs new), the fraction of the post- to pre-edit log-odds gap it recovers
(pooled: gap of the means; and the mean / median of per-prompt fractions over prompts with a gap)
and the distract accuracy after patching, next to the pre- and post-edit accuracy; the top-k
heads against the random-heads control (k random heads in the same layers, averaged over draws);
the sweeps' pooled recovery per cell; the contamination as log-odds damage beside the paper's
P(true) drop (see :data:`CONTAMINATION_MEASURES`, :func:`contamination_p_true`). Intervals are record-clustered bootstrap 95% CIs except the
accuracies' normal intervals. :func:`patch_markdown` is its markdown section; the figures are in
:mod:`attention_drift.views.report_figures`.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attention_drift.measure.patching import PatchingError

from attention_drift.measure.patch_record import (

    CONTAMINATION_COMPONENTS,

    KEY_POSITIONS,

    RANDOM_VARIANT,

    SUMMARY_VARIANTS,

    random_variant_names,

)
from attention_drift.reports.markdown import fmt
from attention_drift.reports.stats import bootstrap_mean, bootstrap_ratio, distinct_records, proportion

PATCH_FORMAT = "attention_drift.analysis.patch/1"


def _variant_stats(patched: np.ndarray, pre: np.ndarray, post: np.ndarray, clusters: Sequence | None = None) -> dict:
    lo, lo_pre, lo_post = (x[:, 0] - x[:, 1] for x in (patched, pre, post))
    gap = lo_pre - lo_post
    ok = np.abs(gap) > 1e-6
    per = (lo[ok] - lo_post[ok]) / gap[ok]
    p, p_pre, p_post = (np.exp(x[:, 0]) for x in (patched, pre, post))
    gap_p = p_pre.mean() - p_post.mean()
    out = {
        **proportion(patched[:, 0] > patched[:, 1]),
        "mean_p_true": float(p.mean()), "mean_logodds": float(lo.mean()),
        "recovery_pooled": float((lo.mean() - lo_post.mean()) / gap.mean()) if abs(gap.mean()) > 1e-9 else None,
        "recovery_mean": float(per.mean()) if per.size else None,
        "recovery_median": float(np.median(per)) if per.size else None,
        "recovery_p_pooled": float((p.mean() - p_post.mean()) / gap_p) if abs(gap_p) > 1e-12 else None,
    }
    if clusters is not None:
        rec = bootstrap_ratio(lo - lo_post, gap, clusters)
        out["recovery_pooled_ci95"] = [rec.ci_low, rec.ci_high]
        out["n_records"] = rec.n_clusters
    return out


def _control_stats(draws: np.ndarray, pre: np.ndarray, post: np.ndarray, clusters: Sequence) -> dict:
    """The random-heads control's statistics over ``draws`` ``[prompt, draw, 2]``: every
    statistic of :func:`_variant_stats` over all (prompt, draw) pairs, which for the means and
    the pooled recovery is the mean over draws; the accuracy's interval from the per-prompt
    fraction of draws that keep the true answer (n = prompts, not prompts x draws); and each
    draw's own accuracy and pooled recovery."""
    n, d = draws.shape[:2]
    out = _variant_stats(draws.reshape(n * d, 2), np.repeat(pre, d, 0), np.repeat(post, d, 0),
                         [c for c in clusters for _ in range(d)])
    right = (draws[..., 0] > draws[..., 1]).mean(1)
    half = 1.96 * math.sqrt(right.var() / n)
    acc = float(right.mean())
    out.update({"accuracy": acc, "ci95": [max(0.0, acc - half), min(1.0, acc + half)], "half_width": half, "n": n,
                "draws": d, "per_draw": {
                    "accuracy": [float((draws[:, i, 0] > draws[:, i, 1]).mean()) for i in range(d)],
                    "recovery_pooled": [_variant_stats(draws[:, i], pre, post)["recovery_pooled"] for i in range(d)]}})
    return out


def _topk_vs_random(topk: np.ndarray, draws: np.ndarray, pre: np.ndarray, post: np.ndarray, clusters) -> dict:
    """Paired per prompt: log-odds with the top-k heads restored minus the mean over draws with
    random heads restored, and that difference as a share of the edit's log-odds gap (pooled),
    with record-clustered bootstrap 95% intervals."""
    diff = (topk[:, 0] - topk[:, 1]) - (draws[..., 0] - draws[..., 1]).mean(1)
    gap = (pre[:, 0] - pre[:, 1]) - (post[:, 0] - post[:, 1])
    return {"draws": int(draws.shape[1]), "logodds_diff": bootstrap_mean(diff, clusters).to_dict(),
            "recovery_diff": bootstrap_ratio(diff, gap, clusters, name="recovery difference").to_dict()}


def _pooled_recovery(patched_true, patched_new, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Pooled log-odds recovery per grid cell over prompts: arrays [prompt, ...]."""
    lo = (patched_true - patched_new).mean(0)
    lo_pre, lo_post = (pre[:, 0] - pre[:, 1]).mean(), (post[:, 0] - post[:, 1]).mean()
    return (lo - lo_post) / (lo_pre - lo_post) if abs(lo_pre - lo_post) > 1e-9 else np.full_like(lo, np.nan)


def _recovery_ci(patched_true, patched_new, pre: np.ndarray, post: np.ndarray, clusters) -> list:
    """Record-clustered bootstrap 95% interval of the pooled recovery of each grid cell:
    ``[..., 2]`` nested lists (NaN where undefined)."""
    lo = patched_true - patched_new
    lo_post = post[:, 0] - post[:, 1]
    gap = (pre[:, 0] - pre[:, 1]) - lo_post
    flat = lo.reshape(lo.shape[0], -1)
    cells = [bootstrap_ratio(flat[:, j] - lo_post, gap, clusters) for j in range(flat.shape[1])]
    return np.array([[c.ci_low, c.ci_high] for c in cells]).reshape(*lo.shape[1:], 2).tolist()


CONTAMINATION_METRIC = (
    "log-odds damage: the drop of log-odds(true vs new) that substituting the edited model's outputs "
    "causes in the unedited model, as a share of the full edit's drop (pooled over prompts: mean substituted "
    "drop / mean edit drop; 1 = the whole edit's damage), with record-clustered bootstrap 95% CIs")


CONTAMINATION_MEASURES = (
    "Two measures, side by side. Log-odds(true vs new) is what decides failure (a prompt fails when the new target "
    "overtakes the true answer). The mean drop of P(true) is the paper's measure; on a small model P(true) is small "
    "to begin with, and a substitution can raise P(new) past it without lowering P(true) much, so the two can rank "
    "the components differently.")
"""What ``patch.json``'s contamination measures and why both are reported."""


def _contamination_damage(contamination: list[dict], clusters: list) -> dict:
    """The contamination measured as log-odds damage (:data:`CONTAMINATION_METRIC`), per
    component, key position and window centre layer, beside the mean P(true) drop there
    (``p_true_drop``, probability, with its interval); plus the full edit's log-odds drop and
    P(true) before / after (:data:`CONTAMINATION_MEASURES`)."""
    lo_pre = np.array([c["pre"][0] - c["pre"][1] for c in contamination])
    lo_post = np.array([c["post"][0] - c["post"][1] for c in contamination])
    p_pre = np.exp([c["pre"][0] for c in contamination])
    p_post = np.exp([c["post"][0] for c in contamination])
    edit_drop = lo_pre - lo_post
    components = {}
    labels = sorted({lab for c in contamination for lab in c["labels"] if lab}, key=KEY_POSITIONS.index)
    for component in CONTAMINATION_COMPONENTS:
        by_label: dict[str, dict] = {}
        for label in labels:
            rows = [(i, c["labels"].index(label)) for i, c in enumerate(contamination) if label in c["labels"]]
            keep = [i for i, _ in rows]
            drop = np.array([lo_pre[i] - (np.array(contamination[i]["components"][component]["lp_true"][j])
                                          - np.array(contamination[i]["components"][component]["lp_new"][j]))
                             for i, j in rows])
            p_drop = np.array([p_pre[i] - np.exp(contamination[i]["components"][component]["lp_true"][j])
                               for i, j in rows])
            ids = [clusters[i] for i in keep]
            share = [bootstrap_ratio(drop[:, l], edit_drop[keep], ids) for l in range(drop.shape[1])]
            nats = [bootstrap_mean(drop[:, l], ids) for l in range(drop.shape[1])]
            probs = [bootstrap_mean(p_drop[:, l], ids) for l in range(p_drop.shape[1])]
            by_label[label] = {"share": [e.value for e in share], "share_ci95": [[e.ci_low, e.ci_high] for e in share],
                               "logodds_drop": [e.value for e in nats],
                               "logodds_drop_ci95": [[e.ci_low, e.ci_high] for e in nats],
                               "p_true_drop": [e.value for e in probs],
                               "p_true_drop_ci95": [[e.ci_low, e.ci_high] for e in probs],
                               "n_prompts": len(keep), "n_records": share[0].n_clusters if share else 0}
        best = max(((lab, l, v) for lab, e in by_label.items() for l, v in enumerate(e["share"]) if math.isfinite(v)),
                   key=lambda t: t[2], default=None)
        components[component] = {"by_position": by_label, "best": None if best is None else {
            "label": best[0], "layer": best[1], "share": best[2], "ci95": by_label[best[0]]["share_ci95"][best[1]],
            "logodds_drop": by_label[best[0]]["logodds_drop"][best[1]]}}
    return {"metric": CONTAMINATION_METRIC, "measures": CONTAMINATION_MEASURES,
            "n_prompts": len(contamination), "n_records": distinct_records(clusters),
            "edit_logodds_drop": bootstrap_mean(edit_drop, clusters).to_dict(),
            "p_true_before": float(p_pre.mean()), "p_true_after": float(p_post.mean()),
            "p_true_change": bootstrap_mean(p_post - p_pre, clusters).to_dict(),
            "components": components}


def contamination_p_true(contamination: dict) -> dict:
    """Per component of ``patch.json``'s ``"contamination"``: the mean P(true) drop (probability)
    per key position and window centre layer (``{"by_position": {label: {"drop": [...], "ci95":
    [[low, high], ...] or None}}``), the largest (``"best"``: label, layer, drop, ci95) and the drop
    where the log-odds damage is largest (``"at_logodds_best"``). Intervals (record-clustered
    bootstrap 95%) where the file stores them (``damage``'s ``p_true_drop``); older files store
    the means only (``"ci95"`` None)."""
    damage = contamination.get("damage") or {}
    out = {}
    for component, v in contamination["components"].items():
        stored = damage.get("components", {}).get(component, {})
        by = {label: {"drop": e["p_true_drop"], "ci95": e["p_true_drop_ci95"]}
              for label, e in stored.get("by_position", {}).items() if "p_true_drop" in e}
        if not by:
            by = {label: {"drop": list(d), "ci95": None} for label, d in v["mean_drop_by_position"].items()}
        label, layer = max(((lab, l) for lab, e in by.items() for l, x in enumerate(e["drop"]) if math.isfinite(x)),
                           key=lambda t: by[t[0]]["drop"][t[1]])

        def at(lab, l):
            return {"label": lab, "layer": l, "drop": by[lab]["drop"][l],
                    "ci95": None if by[lab]["ci95"] is None else by[lab]["ci95"][l]}

        worst = stored.get("best")
        out[component] = {"by_position": by, "best": at(label, layer),
                          "at_logodds_best": at(worst["label"], worst["layer"]) if worst and worst["label"] in by
                          else None}
    return out


def patch_from_lines(lines: Sequence[dict]) -> dict:
    """The ``patch.json`` content rebuilt from per-record lines of :func:`patch_record`.

    Intervals: accuracies (``ci95``) normal-approximation over prompts; everything else
    (``recovery_pooled_ci95``, the top-k vs random comparison, the contamination damage, the
    sweep and window recoveries) record-clustered bootstrap 95% intervals, since a record's
    prompts share its edit. ``variants["attn_pattern_random"]``: the random-heads control, the
    mean over its draws (:func:`_control_stats`); ``"topk_vs_random"``: the paired difference.
    """
    lines = [line for line in lines if line.get("cases")]
    if not lines:
        raise PatchingError("no record with distract-neighbourhood or distract-relation prompts; nothing to report")
    cases = [c for line in lines for c in line["cases"]]
    clusters = [line["case_id"] for line in lines for _ in line["cases"]]
    pre = np.array([c["pre"] for c in cases])
    post = np.array([c["post"] for c in cases])
    control, draws = _control_draws(cases)
    variants = {}
    for name in SUMMARY_VARIANTS:
        keep = [i for i, c in enumerate(cases) if name in c["variants"]]
        if keep:
            patched = np.array([cases[i]["variants"][name] for i in keep])
            variants[name] = _variant_stats(patched, pre[keep], post[keep], [clusters[i] for i in keep])
        if name == "attn_pattern_topk" and control:
            variants[RANDOM_VARIANT] = _control_stats(draws, pre[control], post[control],
                                                      [clusters[i] for i in control])
    groups = [c.get("group", "distract_neighborhood") for c in cases]
    out = {"records": len(lines), "n_prompts": len(cases),
           "n_prompts_by_group": {g: groups.count(g) for g in sorted(set(groups))},
           "records_by_group": {g: distinct_records(c for c, cg in zip(clusters, groups) if cg == g)
                                for g in sorted(set(groups))},
           "pre": _variant_stats(pre, pre, post, clusters),
           "post": _variant_stats(post, pre, post, clusters), "variants": variants,
           "top_heads": {json.dumps(line["case_id"]): line.get("top_heads", []) for line in lines}}
    if RANDOM_VARIANT in variants:
        topk = np.array([cases[i]["variants"]["attn_pattern_topk"] for i in control])
        ids = [clusters[i] for i in control]
        out["topk_vs_random"] = {**_topk_vs_random(topk, draws, pre[control], post[control], ids),
                                 "n_prompts": len(control), "n_records": distinct_records(ids)}
        out["random_heads"] = {json.dumps(line["case_id"]): line.get("random_heads", []) for line in lines}
    sweeps = [s for line in lines for s in line["sweeps"]]
    sweep_ids = [line["case_id"] for line in lines for _ in line["sweeps"]]
    if sweeps:
        s_pre, s_post = np.array([s["pre"] for s in sweeps]), np.array([s["post"] for s in sweeps])
        lc_t = np.array([s["layer_component"]["lp_true"] for s in sweeps])
        lc_n = np.array([s["layer_component"]["lp_new"] for s in sweeps])
        w_t = np.array([s["windows"]["lp_true"] for s in sweeps])
        w_n = np.array([s["windows"]["lp_new"] for s in sweeps])
        n_records = distinct_records(sweep_ids)
        out["sweep"] = {
            "n_prompts": len(sweeps), "n_records": n_records, "components": sweeps[0]["layer_component"]["components"],
            "recovery_pooled": _pooled_recovery(lc_t, lc_n, s_pre, s_post).tolist(),
            "recovery_pooled_ci95": _recovery_ci(lc_t, lc_n, s_pre, s_post, sweep_ids),
            "accuracy": ((lc_t > lc_n).mean(0)).tolist(),
            "mean_p_true": np.exp(lc_t).mean(0).tolist(),
        }
        out["windows"] = {
            "n_prompts": len(sweeps), "n_records": n_records, "labels": sweeps[0]["windows"]["labels"],
            "recovery_pooled": _pooled_recovery(w_t, w_n, s_pre, s_post).tolist(),
            "recovery_pooled_ci95": _recovery_ci(w_t, w_n, s_pre, s_post, sweep_ids),
            "accuracy": ((w_t > w_n).mean(0)).tolist(), "mean_p_true": np.exp(w_t).mean(0).tolist(),
            "pre_accuracy": float((s_pre[:, 0] > s_pre[:, 1]).mean()),
            "post_accuracy": float((s_post[:, 0] > s_post[:, 1]).mean()),
        }
    contamination = [c for line in lines for c in line["contamination"]]
    if contamination:
        summary = {}
        for component in CONTAMINATION_COMPONENTS:
            per_label: dict[str, list] = {}
            best = []
            for c in contamination:
                p_pre = math.exp(c["pre"][0])
                lp = np.array(c["components"][component]["lp_true"])
                drop = p_pre - np.exp(lp)
                i, l = np.unravel_index(int(np.argmax(drop)), drop.shape)
                best.append({"prompt": c["prompt"], "drop": float(drop[i, l]), "relative_drop": float(drop[i, l] / p_pre),
                             "position": c["positions"][i], "token": c["tokens"][i], "label": c["labels"][i],
                             "layer": int(l)})
                for j, label in enumerate(c["labels"]):
                    if label:
                        per_label.setdefault(label, []).append(drop[j])
            summary[component] = {
                "mean_drop_by_position": {k: np.mean(v, 0).tolist() for k, v in per_label.items()},
                "max_drop": max(best, key=lambda b: b["drop"]), "mean_max_drop": float(np.mean([b["drop"] for b in best])),
                "mean_max_relative_drop": float(np.mean([b["relative_drop"] for b in best])),
            }
        p_pre = np.array([math.exp(c["pre"][0]) for c in contamination])
        p_post = np.array([math.exp(c["post"][0]) for c in contamination])
        ids = [line["case_id"] for line in lines for _ in line["contamination"]]
        out["contamination"] = {"n_prompts": len(contamination), "window": None, "components": summary,
                                "full_edit_drop": float((p_pre - p_post).mean()),
                                "full_edit_relative_drop": float(((p_pre - p_post) / p_pre).mean()),
                                "damage": _contamination_damage(contamination, ids)}
    return out


def _control_draws(cases: list[dict]) -> tuple[list[int], np.ndarray]:
    """(indices of the cases with random-heads control variants, their ``[case, draw, 2]`` scores),
    over the draws every such case has."""
    counts = [sum(n.startswith(RANDOM_VARIANT + "/") for n in c["variants"]) for c in cases]
    keep = [i for i, n in enumerate(counts) if n]
    if not keep:
        return [], np.zeros((0, 0, 2))
    names = random_variant_names(min(counts[i] for i in keep))
    return keep, np.array([[cases[i]["variants"][n] for n in names] for i in keep])


VARIANT_LABELS = {
    "none": "post-edit (no patch)",
    "attn_pattern_all": "(a) attention patterns, all layers",
    "attn_pattern_topk": "(b) attention patterns, top-k drifting heads",
    RANDOM_VARIANT: "(b, control) attention patterns, k random heads in the same layers",
    "attn_out_all": "attention outputs, all layers",
    "mlp_out_all": "(c) MLP outputs, all layers, all positions",
    "mlp_out_last": "MLP outputs, all layers, last token",
    "resid_subject": "(d) residual stream at the edited subject's last token, all layers",
}


def variant_label(name: str, stats: dict) -> str:
    """A restoration variant's label in tables and figures (the control with its number of draws)."""
    label = VARIANT_LABELS.get(name, name)
    return f"{label} (mean of {stats['draws']} draws)" if name == RANDOM_VARIANT else label


def _est(e: dict, spec: str = ".3f") -> str:
    return f"{fmt(e['value'], spec)} [{fmt(e['ci_low'], spec)}, {fmt(e['ci_high'], spec)}]"


COMPONENT_NAMES = {"mlp_out": "MLP", "attn_out": "attention"}


def _points(drop: float, ci: list | None) -> str:
    """A P(true) drop (probability) in percentage points, with its interval when there is one."""
    return f"{100 * drop:.2f}" + ("" if ci is None else f" [{fmt(100 * ci[0], '.2f')}, {fmt(100 * ci[1], '.2f')}]")


def _lead(best: dict, key: str, spec: str, unit: str, scale: float = 1.0) -> str:
    """``"MLP (MLP 0.743, attention 0.585 of ...; the intervals do not overlap)"``: which component
    of ``best`` (component -> estimate with ``key`` and ``ci95``) is largest, and by how much."""
    if not best:
        return "none"
    lead = max(best, key=lambda comp: best[comp][key])
    values = ", ".join(f"{COMPONENT_NAMES.get(k, k)} {format(scale * b[key], spec)}" for k, b in best.items())
    cis = [b.get("ci95") for b in best.values()]
    overlap = ""
    if len(cis) == 2 and all(ci is not None for ci in cis):
        apart = cis[0][1] < cis[1][0] or cis[1][1] < cis[0][0]
        overlap = "; the intervals do not overlap" if apart else "; the intervals overlap"
    return f"{COMPONENT_NAMES.get(lead, lead)} ({values}{unit}{overlap})"


def contamination_markdown(c: dict) -> str:
    """The contamination paragraph of a ``patch.json`` ``"contamination"`` with its ``damage``: the
    log-odds damage beside the P(true) drop (:func:`contamination_p_true`), which component leads
    by each, and the paper's numbers (:data:`attention_drift.reports.paper.CONTAMINATION`)."""
    from attention_drift.reports.paper import CONTAMINATION as PAPER

    d = c["damage"]
    p_true = contamination_p_true(c)
    name = {comp: f"{COMPONENT_NAMES.get(comp, comp)} ({comp})" for comp in d["components"]}
    shares = {comp: v["best"] for comp, v in d["components"].items() if v["best"] is not None}
    logodds = "; ".join(f"{name[comp]} at most {b['share']:.3f} [{fmt(b['ci95'][0])}, {fmt(b['ci95'][1])}] of it "
                        f"({b['logodds_drop']:+.3f} nats) at {b['label']}, window centred on layer {b['layer']}"
                        for comp, b in shares.items())
    change = d["p_true_change"]
    full, full_ci = -change["value"], [-change["ci_high"], -change["ci_low"]]
    parts = []
    for comp, v in p_true.items():
        b, at = v["best"], v["at_logodds_best"]
        parts.append(f"{name[comp]} at most {_points(b['drop'], b['ci95'])} points at {b['label']}, window centred "
                     f"on layer {b['layer']} ({100 * b['drop'] / full:.0f}% of the full edit's)"
                     + ("" if at is None else f", {_points(at['drop'], at['ci95'])} where its log-odds damage peaks"))
    has_ci = all(v["best"]["ci95"] is not None for v in p_true.values())
    windows = sum(len(e["drop"]) for e in next(iter(p_true.values()))["by_position"].values())
    lead_lo = max(shares, key=lambda comp: shares[comp]["share"]) if shares else None
    lead_p = max(p_true, key=lambda comp: p_true[comp]["best"]["drop"])
    paper_lead = max(("mlp_out", "attn_out"), key=PAPER.get)
    whole = PAPER["whole model"]
    text = [
        f"Contamination ({d['n_prompts']} prompts, {d['n_records']} records; the edited model's outputs substituted "
        f"into the unedited model over {c.get('window') or '?'}-layer windows at key positions; record-clustered "
        f"bootstrap 95% CIs). {d.get('measures', CONTAMINATION_MEASURES)}",
        f"By log-odds: the full edit lowers log-odds(true vs new) by {_est(d['edit_logodds_drop'])}; substituting "
        f"reproduces, {logodds}.",
        f"By P(true): the full edit lowers mean P(true) by {_points(full, full_ci)} points (from "
        f"{100 * d['p_true_before']:.2f}% to {100 * d['p_true_after']:.2f}%); substituting lowers it, "
        + "; ".join(parts) + "."
        + ("" if has_ci else " These component drops are means only: this patch.json keeps no per-prompt P(true) "
           "drop per window, so they have no CI (a run made with this version stores them)."),
        "Which leads: by log-odds " + _lead(shares, "share", ".3f", " of the edit's drop") + "; by P(true) "
        + _lead({k: v["best"] for k, v in p_true.items()}, "drop", ".2f", " points", scale=100.0)
        + ("" if has_ci else f", without CIs: the full edit's own interval is {100 * (full_ci[1] - full_ci[0]):.2f} "
           "points wide, so an order this close is not established") + ". "
        f"The paper (GPT-J-6B) reports P(correct) -{PAPER['mlp_out']}% (MLP), -{PAPER['attn_out']}% (attention), "
        f"-{whole}% (whole model): {COMPONENT_NAMES[paper_lead]} ahead, MLP {100 * PAPER['mlp_out'] / whole:.0f}% and "
        f"attention {100 * PAPER['attn_out'] / whole:.0f}% of the whole model's drop; here "
        + ", ".join(f"{COMPONENT_NAMES.get(k, k)} {100 * v['best']['drop'] / full:.0f}%" for k, v in p_true.items())
        + " of the full edit's, " + ("the paper's order" if lead_p == paper_lead else "the reverse of the paper's order")
        + " by P(true)" + ("" if lead_lo is None else (", the paper's order" if lead_lo == paper_lead
                                                         else ", the reverse") + " by log-odds") + ". "
        f"Each 'at most' is the largest of {windows} window and position means, so it is biased upward; the paper's "
        "whole-model number is set here beside the real edit's drop; and mean P(true) before the edit, "
        f"{100 * d['p_true_before']:.2f}% here, bounds every P(true) drop while the log-odds has no such ceiling."]
    return "\n\n".join(text)


def patch_markdown(result: dict, title: str = "") -> str:
    """The patching section: per restoration variant the accuracy on the distract prompts (95% CI), mean P(true) and
    log-odds, and the pooled recovery of the log-odds gap (record-clustered 95% CI); the top-k
    heads against the random-heads control; the best attention window; the contamination as
    log-odds damage (and why not P(true))."""
    records = result["records"]
    rows = [f"## patching (restoration){' · ' + title if title else ''}", "",
            f"{records} records, {result['n_prompts']} distract prompts ("
            + ", ".join(f"{n} {g.replace('_', '-')}" for g, n in result.get(
                "n_prompts_by_group", {"distract_neighborhood": result["n_prompts"]}).items()) + ")", "",
            "| variant | accuracy ± ci | mean P(true) | mean log-odds | recovery (pooled) [95% CI] | "
            "recovery (median) |", "|---|---:|---:|---:|---:|---:|"]

    def row(label, s):
        rec = "–" if s.get("recovery_pooled") is None else f"{s['recovery_pooled']:.3f}"
        if s.get("recovery_pooled_ci95") and s.get("recovery_pooled") is not None:
            rec += f" [{fmt(s['recovery_pooled_ci95'][0])}, {fmt(s['recovery_pooled_ci95'][1])}]"
        med = "–" if s.get("recovery_median") is None else f"{s['recovery_median']:.3f}"
        return (f"| {label} | {100 * s['accuracy']:.1f} ± {100 * s['half_width']:.1f} | {s['mean_p_true']:.4f} | "
                f"{s['mean_logodds']:+.3f} | {rec} | {med} |")

    rows.append(row("pre-edit", result["pre"]))
    for name, s in result["variants"].items():
        rows.append(row(variant_label(name, s), s))
    if "topk_vs_random" in result:
        t = result["topk_vs_random"]
        rows += ["", f"Top-k drifting heads vs k random heads in the same layers (paired over {t['n_prompts']} prompts, "
                 f"{t['n_records']} records, {t['draws']} random draws each; record-clustered bootstrap 95% CIs): "
                 f"restoring the top-k heads gives {_est(t['logodds_diff'], '+.3f')} more log-odds(true vs new), "
                 f"{_est(t['recovery_diff'], '+.3f')} more of the edit's log-odds gap."]
    elif "attn_pattern_topk" in result["variants"]:
        rows += ["", "No random-heads control: the top-k heads leave too few other heads (or it was not asked for)."]
    if "windows" in result:
        w = result["windows"]
        best = int(np.nanargmax(np.array(w["recovery_pooled"], dtype=float)))
        ci = w.get("recovery_pooled_ci95")
        rows += ["", f"10-layer windows of attention patterns ({w['n_prompts']} prompts, {w.get('n_records', '?')} "
                 f"records): best window {w['labels'][best]} recovers {w['recovery_pooled'][best]:.3f}"
                 + (f" [{fmt(ci[best][0])}, {fmt(ci[best][1])}]" if ci else "") +
                 f" of the log-odds gap (accuracy {100 * w['accuracy'][best]:.1f}% vs pre {100 * w['pre_accuracy']:.1f}%, "
                 f"post {100 * w['post_accuracy']:.1f}%)"]
    if "contamination" in result:
        c = result["contamination"]
        d = c.get("damage")
        if d is None:  # a patch.json written before the damage was recorded
            parts = [f"{comp}: largest drop in P(true) {v['max_drop']['drop']:.4f} at {v['max_drop']['label']}"
                     for comp, v in c["components"].items()]
            rows += ["", f"Contamination ({c['n_prompts']} prompts): " + "; ".join(parts)]
        else:
            rows += ["", contamination_markdown(c)]
    return "\n".join(rows)


_OPTIONAL = ("topk_vs_random", "random_heads", "sweep", "windows", "contamination")


@dataclass(frozen=True)
class PatchReport:
    """``patch.json``: the patching statistics over records (:func:`patch_from_lines`).

    Args:
        records: records with prompts; n_prompts: their distract prompts.
        n_prompts_by_group, records_by_group: the same per prompt group.
        pre, post: the unedited / edited model's statistics (as a variant's).
        variants: per restoration variant, its statistics (:data:`~attention_drift.measure.patch_record.SUMMARY_VARIANTS`,
            and the random-heads control).
        top_heads: per record (JSON case id), the heads its top-k patch restored.
        topk_vs_random, random_heads: the top-k heads against the control, and the control's heads.
        sweep, windows: per layer and component, and per sliding window, the pooled recovery.
        contamination: the edited model's outputs substituted into the unedited one.
        meta: the run's header (model, method, options), once a run wrote it.
    """

    records: int
    n_prompts: int
    n_prompts_by_group: dict
    records_by_group: dict
    pre: dict
    post: dict
    variants: dict
    top_heads: dict
    topk_vs_random: dict | None = None
    random_heads: dict | None = None
    sweep: dict | None = None
    windows: dict | None = None
    contamination: dict | None = None
    meta: dict | None = None

    @classmethod
    def from_lines(cls, lines: Sequence[dict]) -> "PatchReport":
        return cls.from_dict(patch_from_lines(lines))

    @classmethod
    def from_dict(cls, content: dict) -> "PatchReport":
        """From ``patch.json``'s content (keys it does not know, such as ``markdown``, are dropped)."""
        return cls(**{k: content[k] for k in cls.__dataclass_fields__ if k in content})

    def to_dict(self) -> dict:
        """``patch.json``'s content, keys in the order the file has always had them."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: v for k, v in out.items() if v is not None or k not in (*_OPTIONAL, "meta")}

    def markdown(self, title: str = "") -> str:
        return patch_markdown(self.to_dict(), title)
