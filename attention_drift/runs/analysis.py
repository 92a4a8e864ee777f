"""The run layer of the ``attention-drift drift`` and ``attention-drift patch`` commands.

Both edit every record on its own (single-edit protocol: the weights are restored after each
record), measure it with the one per-record function the notebooks use too
(:func:`attention_drift.measure.drift.drift_record`, :func:`attention_drift.measure.patching.patch_record`),
write its line to a run file in the output folder as soon as the record is done (re-running
with the same folder skips the records already there), then rebuild the whole result from that
file, write ``drift.json`` / ``patch.json`` and the figures, and return a short markdown summary.
No measurement happens here: this module is resume, IO, aggregation, figures and markdown.

:func:`run_drift` (RQ3 of the paper): per record, attention drift of every head at the
prediction position on the distract-neighbourhood and distract-relation prompts; over records
(:func:`drift_from_lines`, i.e. :func:`attention_drift.measure.drift.drift_report`), per-head statistics,
the top drifting heads with their attention to the edited subject's last token before -> after
the edit, and how drift predicts specificity failure (Pearson / Spearman with 95% CIs, AUROC,
binned failure curves). Failure is counted on the prompts the unedited model got right only
(:class:`attention_drift.measure.drift.Outcome`); the markdown and the drift-vs-failure figure say how
many prompts that keeps and excludes, and show the attention-mass factor beside the KL factor.

:func:`run_patch` (RQ4 and RQ2): per record, the restoration variants, sweeps and contamination
of :func:`attention_drift.measure.patching.patch_record` on its distract-neighbourhood prompts; over
records (:func:`patch_from_lines`), per variant: mean P(true), mean log-odds(true vs new), the
fraction of the post- to pre-edit log-odds gap it recovers (pooled: gap of the means; and the
mean / median of per-prompt fractions over prompts with a gap) and the distract-neighbourhood
accuracy after patching (the fraction of prompts where the true answer beats the new target,
the paper's strict per-token test), next to the pre- and post-edit accuracy; the top-k heads
against the random-heads control (k random heads in the same layers, averaged over draws); the
sweeps' pooled recovery per cell; the contamination as log-odds damage (the share of the
edit's log-odds drop a substitution reproduces; the paper's P(true) drop is kept in the JSON
but is not the measure, see :data:`CONTAMINATION_WHY`). Intervals are record-clustered
bootstrap 95% CIs except the accuracies' normal intervals.

Run-file lines are :meth:`attention_drift.measure.drift.RecordDrift.to_line` and
:meth:`attention_drift.measure.patching.RecordPatch.to_line` plus ``"method"`` (a record without
prompts: ``{"case_id", "kind", "samples" or "cases": [], "skipped": "no prompts", "method"}``).
"""

import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attention_drift.core.data import Record
from attention_drift.runs.variants import Variant
from attention_drift.measure.drift import (
    DEFAULT_GROUPS,
    DriftError,
    EditFactory,
    HeadCapture,
    RecordDrift,
    drift_record,
    drift_report,
)
from attention_drift.core.jsonl import RunFile, read_run
from attention_drift.measure.patching import (  # noqa: F401  (SWEEP_COMPONENTS re-exported)
    CONTAMINATION_COMPONENTS,
    KEY_POSITIONS,
    RANDOM_DRAWS,
    RANDOM_VARIANT,
    SUMMARY_VARIANTS,
    SWEEP_COMPONENTS,
    PatchingError,
    patch_record,
    random_variant_names,
)
from attention_drift.reports.stats import bootstrap_mean, bootstrap_ratio, proportion

DRIFT_FORMAT = "attention_drift.analysis.drift/1"
PATCH_FORMAT = "attention_drift.analysis.patch/1"
DRIFT_GROUPS = DEFAULT_GROUPS
CAPTURE_TOP_K = 6
"""Heads per record whose full patterns a drift run keeps for the explorer: the record's own
most drifting ones (6 keeps a 100-record page near 3-4 MB)."""


def _progress(items, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="record", file=sys.stderr, dynamic_ncols=True, total=total)


def _measured(records: Sequence[Record], fn, model, edit_fn_factory, executor, edit_cache, desc: str,
              progress: bool):
    """``(record, fn(model, edit_fn_factory, record))`` per record, on ``executor``
    (:class:`attention_drift.runs.executor.Executor`; None: this process, with ``model``), in the
    order records finish; see :func:`run_drift`."""
    from attention_drift.runs.executor import Executor

    if executor is None:
        executor = Executor.here(model)
    results = executor.measure(records, fn, edit_fn_factory, edit_cache=edit_cache, progress=progress)
    if not executor.in_process:
        desc = f"{desc} ({executor.placement.workers} workers)"
    return _progress(results, desc, progress, total=len(records))


def _n_records(case_ids) -> int:
    """How many distinct records ``case_ids`` (one per prompt) name."""
    return len({json.dumps(c) for c in case_ids})


def _save_figure(fig, path: Path, png: bool) -> list[str]:
    """Write ``fig`` as HTML (and PNG), with the paper's value for this figure
    (:data:`attention_drift.reports.paper.REPORTED`, by file stem) below it where the paper gives one."""
    from attention_drift.views import plots
    from attention_drift.reports.paper import REPORTED

    if path.name in REPORTED:
        plots.add_reference(fig, REPORTED[path.name])

    written = plots.save(fig, path.with_suffix(".html"))
    if png:
        try:
            written += plots.save(fig, path.with_suffix(".png"))
        except plots.PngExportError as err:
            print(f"attention-drift: no PNG for {path.name}: {err}", file=sys.stderr)
    return [str(p) for p in written]


def _png_ok() -> bool:
    from attention_drift.views import plots

    problem = plots.png_export_problem()
    if problem:
        print(f"attention-drift: HTML only, no PNG: {problem}", file=sys.stderr)
    return problem is None


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _lines_of(run_path: Path, records: Sequence[Record]) -> list[dict]:
    """The run file's lines of ``records`` (a run file may hold more records than asked for)."""
    wanted = {json.dumps(r.case_id) for r in records}
    return [line for line in read_run(run_path).records if json.dumps(line["case_id"]) in wanted]


# =============================================================================================
# drift


def drift_from_lines(lines: Sequence[dict], groups: Sequence[str] = DRIFT_GROUPS, *, top_k: int = 10,
                     threshold: float = 0.05) -> dict:
    """The ``drift.json`` content of run-file lines (:meth:`RecordDrift.to_line`; skipped records
    are left out): :func:`~attention_drift.measure.drift.drift_report` of the records they hold."""
    records = [RecordDrift.from_line(line) for line in lines if line.get("samples")]
    if not records:
        raise DriftError("no record with distract prompts containing its subject; nothing to report")
    return drift_report(records, groups, threshold=threshold).to_dict(top_k)


def _ci(entry: dict, low: str = "ci_low", high: str = "ci_high") -> str:
    return f"[{_fmt(entry[low], '.2f')}, {_fmt(entry[high], '.2f')}]"


def _failure_sentence(result: dict) -> str:
    """How many prompts the failure statistics keep, and the failure rate per group."""
    f = result["failure"]["all"]
    rates = ", ".join(
        f"{g} {_fmt(v['rate'], '.2f')} [{_fmt(v['ci95'][0], '.2f')}, {_fmt(v['ci95'][1], '.2f')}] "
        f"({v['n_failed']} / {v['n_kept']})"
        for g, v in result["failure"].items() if v["n_kept"])
    wrong = ", ".join(f"{g} {_fmt(v, '.2f')}" for g, v in result["wrong_after_rate"].items()
                      if g == "all" or result["n_samples_by_group"].get(g))
    return (f"Failure: a prompt the unedited model got right (P(true) ≥ P(new)) that the edited model gets wrong. "
            f"Prompts already wrong before the edit are excluded from every failure statistic: kept "
            f"{f['n_kept']} of {f['n_prompts']} prompts ({f['n_excluded_wrong_before']} excluded), from "
            f"{f['n_records_kept']} of {f['n_records']} records. Failure rate [95% CI] (failed / kept): {rates}. "
            f"(Wrong after the edit over all prompts, which counts the prompts wrong before too: {wrong}.)")


def drift_markdown(result: dict, title: str = "") -> str:
    """The drift section: sizes, the failure definition and rate, the top heads, and per group and
    :data:`~attention_drift.measure.drift.HEADLINE_FACTORS` factor the Pearson and Spearman correlations
    (Fisher-z 95% CIs) with failure and with the log-odds drop and the AUROC for failure
    (record-clustered bootstrap 95% CI), over the prompts right before the edit."""
    rows = [f"## attention drift{' · ' + title if title else ''}", "",
            f"{result['records']} records, {result['n_samples']} prompts "
            f"({', '.join(f'{g}: {n}' for g, n in result['n_samples_by_group'].items())}).", "",
            _failure_sentence(result), "",
            "| layer | head | subject attn before → after | mean drift | frac > 0.05 |", "|---:|---:|---|---:|---:|"]
    for t in result["top_heads"]:
        rows.append(f"| {t['layer']} | {t['head']} | {t['before']:.3f} → {t['after']:.3f} | "
                    f"{t['drift']:+.3f} | {t['frac_above']:.2f} |")
    rows += ["", "Drift factors vs failure and log-odds(true vs new) drop, over the prompts right before the edit "
             "(correlations: Fisher-z 95% CIs; AUROC: record-clustered bootstrap 95% CI):", "",
             "| group | factor | Pearson r vs failure | Spearman ρ vs failure | AUROC for failure | "
             "Pearson r vs log-odds drop | Spearman ρ vs log-odds drop | prompts / records |",
             "|---|---|---|---|---|---|---|---:|"]
    for group, by_factor in result["headline_right_before"].items():
        for factor, h in by_factor.items():
            if not h["n_prompts"]:  # a group without prompts in this run (e.g. relation prompts of CounterFact records)
                continue
            cells = [f"{_fmt(h[k]['r'])} {_ci(h[k])}" for k in ("pearson_failure", "spearman_failure")]
            cells.append(f"{_fmt(h['auroc']['value'])} {_ci(h['auroc'])}")
            cells += [f"{_fmt(h[k]['r'])} {_ci(h[k])} (p {_fmt(h[k]['p_value'], '.2g')})"
                      for k in ("pearson_logodds_drop", "spearman_logodds_drop")]
            rows.append(f"| {group} | {factor} | " + " | ".join(cells) + f" | {h['n_prompts']} / {h['n_records']} |")
    return "\n".join(rows)


FIGURE_FACTORS = {"max_drift_subject_last": "max over heads of the drift of attention to the subject's last token",
                  "max_kl": "max over heads of KL(before ‖ after) of the attention row"}
"""The factors of the drift-vs-failure figure, side by side: attention mass and KL."""


def drift_failure_figure(result: dict, factors: dict[str, str] = FIGURE_FACTORS):
    """The drift-vs-failure figure of a ``drift.json`` content (:meth:`DriftReport.to_dict`): one
    panel per factor (default: the attention-mass factor beside the KL factor), the log-odds
    drop of every prompt right before the edit (failed ones coloured), binned means with 95%
    CIs, Pearson and Spearman with the log-odds drop (95% CIs), the AUROC for failure (95% CI)
    and n. None when fewer than 2 such prompts have finite values."""
    from attention_drift.views import plots

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
            "n_records": _n_records(s["case_id"] for s in kept), "xlabel": f"{factor}: {label}"})
    if not panels:
        return None
    return plots.drift_vs_failure_panels(panels, ylabel="log-odds(true vs new) drop", title=(
        f"Drift vs failure · {failure['n_kept']} prompts right before the edit, {failure['n_records_kept']} records "
        f"({failure['n_excluded_wrong_before']} wrong before the edit excluded)"))


def _drift_figures(result: dict, out: Path, png: bool) -> list[str]:
    from attention_drift.views import plots

    written = []
    before = torch.tensor(result["subject_last_attention"]["before"])
    after = torch.tensor(result["subject_last_attention"]["after"])
    stats = result["head_stats"]["delta_subject_last"]
    mean, sem = torch.tensor(stats["mean"]), torch.tensor(stats["sem"])
    kl = torch.tensor(result["head_stats"]["kl"]["mean"])
    fig = plots.drift_heatmap(before, after, kl=kl, drift_ci=(mean - 1.96 * sem, mean + 1.96 * sem), title=(
        f"Drift of attention to the edited subject · {result['n_samples']} prompts, "
        f"{result['records']} records (hover: 95% CI of each head's mean drift)"))
    written += _save_figure(fig, out / "drift_heatmap", png)
    fig = drift_failure_figure(result)
    if fig is None:
        print(f"attention-drift: no drift_vs_failure figure: {result['failure']['all']['n_kept']} prompt(s) right "
              "before the edit, 2 needed", file=sys.stderr)
    else:
        written += _save_figure(fig, out / "drift_vs_failure", png)
    return written


def _prompt_patterns(model, record: Record, capture: HeadCapture) -> dict[int, dict]:
    """A record's captured patterns in the explorer's schema (:class:`attention_drift.views.explorer.PromptPatterns`)."""
    from attention_drift.core.regions import Regions

    out = {}
    for i, prompt in enumerate(capture.prompts):
        subject = Regions.of(model, record.rewrite, prompt).subject
        out[i] = {"tokens": capture.tokens[i], "query": len(capture.tokens[i]) - 1, "subject_last": subject[1],
                  "heads": {head: (capture.before[i][j].float().numpy(), capture.after[i][j].float().numpy())
                            for j, head in enumerate(capture.heads)}}
    return out


def _drift_lines(model, edit_fn_factory: EditFactory, record: Record, *, groups: Sequence[str], capture_heads,
                 method: str) -> tuple[dict, dict | None]:
    """A record's drift run line and its explorer patterns line (None without prompts)."""
    from attention_drift.views import explorer

    result = drift_record(model, record, edit_fn_factory, groups, capture_heads=capture_heads)
    if result is None:
        return {"case_id": record.case_id, "kind": record.kind, "samples": [], "skipped": "no prompts",
                "method": method}, None
    patterns = explorer.patterns_line(record.case_id, _prompt_patterns(model, record, result.capture), method)
    return {**result.to_line(), "method": method}, patterns


def run_drift(model, records: Sequence[Record], edit_fn_factory: EditFactory | Variant | None, out_dir, meta: dict, *,
              groups: Sequence[str] = DRIFT_GROUPS, top_k: int = 10, method: str = "edit",
              progress: bool = False, figures: bool = True,
              capture_heads: Sequence[tuple[int, int]] | int | str = CAPTURE_TOP_K, executor=None,
              edit_cache: str | None = None) -> dict:
    """Measure drift record by record (:func:`~attention_drift.measure.drift.drift_record`, resumable in
    ``out_dir/drift_records.jsonl``), then write ``drift.json``, the figures and the drift
    explorer (``explorer.html``); returns the ``drift.json`` content plus ``"markdown"`` (and
    ``"figures"``).

    ``capture_heads`` (see :func:`~attention_drift.measure.drift.drift_record`; default: each record's
    :data:`CAPTURE_TOP_K` most drifting heads) picks the heads whose full attention patterns
    before / inside the edit are kept, from the measurement's own forward passes, in
    ``out_dir/drift_patterns.jsonl`` for the explorer's per-head panels.

    Where the records are measured: ``executor`` (an :class:`attention_drift.runs.executor.Executor`:
    this process or Ray workers, as its placement says), whose workers load the model themselves
    (``model`` is then not used; None is fine) and build the editor of ``edit_fn_factory``, then a
    :class:`~attention_drift.runs.variants.Variant` (replaying stored edits from the ``edit_cache``
    folder), after computing its statistics once; None: in this process with ``model`` and
    ``edit_fn_factory`` (a Variant, or an editor already built over ``model``). The lines are the
    same either way, written here (the only writer) in the order records finish.
    """
    from attention_drift.views import explorer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / explorer.RUN_FILE
    meta = {"format": DRIFT_FORMAT, **meta, "groups": list(groups)}
    capture_meta = capture_heads if isinstance(capture_heads, (int, str)) else [list(h) for h in capture_heads]
    with RunFile(run_path, meta) as run, \
            RunFile(out / explorer.PATTERNS_FILE, {**meta, "format": explorer.PATTERNS_FORMAT,
                                                   "capture_heads": capture_meta}) as patterns:
        todo = [r for r in records if not run.done(r.case_id, method)]
        fn = functools.partial(_drift_lines, groups=tuple(groups), capture_heads=capture_heads, method=method)
        for record, (line, pattern_line) in _measured(todo, fn, model, edit_fn_factory, executor, edit_cache,
                                                      "drift", progress):
            if pattern_line is not None and not patterns.done(record.case_id, method):
                patterns.write(pattern_line)
            run.write(line)
    result = drift_from_lines(_lines_of(run_path, records), groups, top_k=top_k)
    result["meta"] = meta
    (out / "drift.json").write_text(json.dumps(result, indent=1))
    if figures:
        result["figures"] = _drift_figures(result, out, _png_ok())
        page = explorer.ExplorerData.from_run(out, title=f"Attention drift · {meta.get('model')} · {method}")
        result["figures"].append(str(explorer.write_explorer(out / "explorer.html", page)))
    result["markdown"] = drift_markdown(result, f"{meta.get('model')} · {method}")
    return result


# =============================================================================================
# patch


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
CONTAMINATION_WHY = (
    "A prompt fails when the new target overtakes the true answer, so the measure is the log-odds of the two; on a "
    "small model P(true) is small to begin with, and an edit or a substitution can raise P(new) past it without "
    "lowering P(true) much, so a P(true) drop (the paper's measure, kept in patch.json) understates the damage and "
    "is not comparable to the paper's GPT-J percentages.")


def _contamination_damage(contamination: list[dict], clusters: list) -> dict:
    """The contamination measured as log-odds damage (:data:`CONTAMINATION_METRIC`), per
    component, key position and window centre layer; plus the full edit's log-odds drop and
    P(true) before / after, which say why P(true) is not the measure (:data:`CONTAMINATION_WHY`)."""
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
            ids = [clusters[i] for i in keep]
            share = [bootstrap_ratio(drop[:, l], edit_drop[keep], ids) for l in range(drop.shape[1])]
            nats = [bootstrap_mean(drop[:, l], ids) for l in range(drop.shape[1])]
            by_label[label] = {"share": [e.value for e in share], "share_ci95": [[e.ci_low, e.ci_high] for e in share],
                               "logodds_drop": [e.value for e in nats],
                               "logodds_drop_ci95": [[e.ci_low, e.ci_high] for e in nats],
                               "n_prompts": len(keep), "n_records": share[0].n_clusters if share else 0}
        best = max(((lab, l, v) for lab, e in by_label.items() for l, v in enumerate(e["share"]) if math.isfinite(v)),
                   key=lambda t: t[2], default=None)
        components[component] = {"by_position": by_label, "best": None if best is None else {
            "label": best[0], "layer": best[1], "share": best[2], "ci95": by_label[best[0]]["share_ci95"][best[1]],
            "logodds_drop": by_label[best[0]]["logodds_drop"][best[1]]}}
    return {"metric": CONTAMINATION_METRIC, "why_not_p_true": CONTAMINATION_WHY,
            "n_prompts": len(contamination), "n_records": _n_records(clusters),
            "edit_logodds_drop": bootstrap_mean(edit_drop, clusters).to_dict(),
            "p_true_before": float(p_pre.mean()), "p_true_after": float(p_post.mean()),
            "p_true_change": bootstrap_mean(p_post - p_pre, clusters).to_dict(),
            "components": components}


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
           "records_by_group": {g: _n_records(c for c, cg in zip(clusters, groups) if cg == g)
                                for g in sorted(set(groups))},
           "pre": _variant_stats(pre, pre, post, clusters),
           "post": _variant_stats(post, pre, post, clusters), "variants": variants,
           "top_heads": {json.dumps(line["case_id"]): line.get("top_heads", []) for line in lines}}
    if RANDOM_VARIANT in variants:
        topk = np.array([cases[i]["variants"]["attn_pattern_topk"] for i in control])
        ids = [clusters[i] for i in control]
        out["topk_vs_random"] = {**_topk_vs_random(topk, draws, pre[control], post[control], ids),
                                 "n_prompts": len(control), "n_records": _n_records(ids)}
        out["random_heads"] = {json.dumps(line["case_id"]): line.get("random_heads", []) for line in lines}
    sweeps = [s for line in lines for s in line["sweeps"]]
    sweep_ids = [line["case_id"] for line in lines for _ in line["sweeps"]]
    if sweeps:
        s_pre, s_post = np.array([s["pre"] for s in sweeps]), np.array([s["post"] for s in sweeps])
        lc_t = np.array([s["layer_component"]["lp_true"] for s in sweeps])
        lc_n = np.array([s["layer_component"]["lp_new"] for s in sweeps])
        w_t = np.array([s["windows"]["lp_true"] for s in sweeps])
        w_n = np.array([s["windows"]["lp_new"] for s in sweeps])
        n_records = _n_records(sweep_ids)
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


def _variant_label(name: str, stats: dict) -> str:
    """A restoration variant's label in tables and figures (the control with its number of draws)."""
    label = VARIANT_LABELS.get(name, name)
    return f"{label} (mean of {stats['draws']} draws)" if name == RANDOM_VARIANT else label


def _est(e: dict, spec: str = ".3f") -> str:
    return f"{_fmt(e['value'], spec)} [{_fmt(e['ci_low'], spec)}, {_fmt(e['ci_high'], spec)}]"


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
            rec += f" [{_fmt(s['recovery_pooled_ci95'][0])}, {_fmt(s['recovery_pooled_ci95'][1])}]"
        med = "–" if s.get("recovery_median") is None else f"{s['recovery_median']:.3f}"
        return (f"| {label} | {100 * s['accuracy']:.1f} ± {100 * s['half_width']:.1f} | {s['mean_p_true']:.4f} | "
                f"{s['mean_logodds']:+.3f} | {rec} | {med} |")

    rows.append(row("pre-edit", result["pre"]))
    for name, s in result["variants"].items():
        rows.append(row(_variant_label(name, s), s))
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
                 + (f" [{_fmt(ci[best][0])}, {_fmt(ci[best][1])}]" if ci else "") +
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
            parts = []
            for comp, v in d["components"].items():
                b = v["best"]
                if b is not None:
                    parts.append(f"{comp}: at most {b['share']:.3f} [{_fmt(b['ci95'][0])}, {_fmt(b['ci95'][1])}] "
                                 f"of the edit's log-odds drop ({b['logodds_drop']:+.3f} nats) at {b['label']}, "
                                 f"window centred on layer {b['layer']}")
            e = d["edit_logodds_drop"]
            rows += ["", f"Contamination as log-odds damage ({d['n_prompts']} prompts, {d['n_records']} records; "
                     f"{c.get('window') or '?'}-layer windows; record-clustered bootstrap 95% CIs): the full edit "
                     f"lowers log-odds(true vs new) by {_est(e)} on average; substituting the edited model's outputs "
                     "into the unedited model reproduces, " + "; ".join(parts) + ". "
                     f"Why log-odds and not the paper's P(true) drop: mean P(true) is {d['p_true_before']:.4f} before "
                     f"and {d['p_true_after']:.4f} after the edit (change {_est(d['p_true_change'], '+.4f')}). "
                     + d["why_not_p_true"]]
    return "\n".join(rows)


def _patch_figures(result: dict, out: Path, png: bool) -> list[str]:
    from attention_drift.views import plots

    written = []
    n = f"{result['n_prompts']} prompts, {result['records']} records"

    def recovery(s):
        ci = s.get("recovery_pooled_ci95") or [None, None]
        value = s.get("recovery_pooled")
        return {"accuracy": value, "ci95": None if ci[0] is None or value is None else ci}

    accuracy = "accuracy on the distract prompts"
    bars = {"pre-edit": {accuracy: result["pre"], "log-odds gap recovered": recovery(result["pre"])}}
    for name, s in result["variants"].items():
        bars[_variant_label(name, s)] = {accuracy: s, "log-odds gap recovered": recovery(s)}
    fig = plots.metric_bars(bars, f"Restoring pre-edit activations · {n} (95% CIs)", ylabel="%")
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0}, height=760)
    written += _save_figure(fig, out / "patch_accuracy", png)
    if "sweep" in result:
        s = result["sweep"]
        rec = torch.tensor(s["recovery_pooled"], dtype=torch.float64)
        ci = s.get("recovery_pooled_ci95")
        fig = plots.patching_heatmap(
            rec, list(range(rec.shape[0])), s["components"],
            f"Restoration per layer · pooled log-odds recovery, {s['n_prompts']} prompts, "
            f"{s.get('n_records', '?')} records (hover: 95% CI)",
            ci=None if ci is None else tuple(torch.tensor(ci, dtype=torch.float64).unbind(-1)))
        written += _save_figure(fig, out / "patch_layer_component", png)
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
        written += _save_figure(fig, out / "patch_windows", png)
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
            written += _save_figure(fig, out / "patch_contamination", png)
    return written


def load_top_heads(path, k: int) -> list[tuple[int, int]]:
    """The first ``k`` top heads of a ``drift.json`` written by :func:`run_drift`."""
    data = json.loads(Path(path).read_text())
    if "top_heads" not in data:
        raise DriftError(f"{path} has no 'top_heads'; give a drift.json written by 'attention-drift drift'")
    heads = [(t["layer"], t["head"]) for t in data["top_heads"]][:k]
    if len(heads) < k:
        print(f"attention-drift: {path} lists {len(heads)} heads, fewer than k={k}", file=sys.stderr)
    return heads


def _patch_line(model, edit_fn_factory: EditFactory, record: Record, *, method: str, **options) -> dict:
    """A record's patching run line (:func:`~attention_drift.measure.patching.patch_record` with ``options``)."""
    result = patch_record(model, record, edit_fn_factory, **options)
    line = ({"case_id": record.case_id, "kind": record.kind, "cases": [], "skipped": "no prompts"}
            if result is None else result.to_line())
    return {**line, "method": method}


def run_patch(model, records: Sequence[Record], edit_fn_factory: EditFactory | Variant | None, out_dir, meta: dict, *,
              k: int = 10, heads: Sequence[tuple[int, int]] | None = None, window: int = 10,
              sweep_prompts: int = 1, contamination_prompts: int = 1, contamination_window: int = 6,
              contamination_positions: str = "key", batch_size: int = 64, method: str = "edit",
              progress: bool = False, figures: bool = True, random_draws: int = RANDOM_DRAWS, executor=None,
              edit_cache: str | None = None) -> dict:
    """Patch record by record (:func:`~attention_drift.measure.patching.patch_record`, resumable in
    ``out_dir/patch_records.jsonl``), then write ``patch.json`` and the figures; returns the
    ``patch.json`` content plus ``"markdown"`` (and ``"figures"``). ``random_draws``: draws of
    the random-heads control of the top-k heads patch (0: none). ``executor``, ``edit_cache``: as in
    :func:`run_drift`."""
    if k < 1:
        raise PatchingError(f"k must be >= 1, got {k}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / "patch_records.jsonl"
    meta = {"format": PATCH_FORMAT, **meta, "k": k, "heads": None if heads is None else [list(h) for h in heads],
            "window": window, "sweep_prompts": sweep_prompts, "contamination_prompts": contamination_prompts,
            "contamination_window": contamination_window, "contamination_positions": contamination_positions,
            "random_draws": random_draws}
    with RunFile(run_path, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, method)]
        fn = functools.partial(_patch_line, method=method, k=k, heads=heads, window=window,
                               sweep_prompts=sweep_prompts, contamination_prompts=contamination_prompts,
                               contamination_window=contamination_window,
                               contamination_positions=contamination_positions, batch_size=batch_size,
                               random_draws=random_draws)
        for _, line in _measured(todo, fn, model, edit_fn_factory, executor, edit_cache, "patch", progress):
            run.write(line)
    result = patch_from_lines(_lines_of(run_path, records))
    if "contamination" in result:
        result["contamination"]["window"] = contamination_window
    result["meta"] = meta
    (out / "patch.json").write_text(json.dumps(result, indent=1))
    if figures:
        result["figures"] = _patch_figures(result, out, _png_ok())
    result["markdown"] = patch_markdown(result, f"{meta.get('model')} · {method}")
    return result
