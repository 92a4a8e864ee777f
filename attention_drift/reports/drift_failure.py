"""Drift vs failure with record-clustered intervals: how well each drift factor predicts each
failure measure, and whether the max drift predicts better than the summed drift.

Everything is computed from drift samples as ``drift.json`` holds them (``result["samples"]``:
dicts of :meth:`~attention_drift.measure.drift.DriftSample.to_dict`), so a committed
``drift.json`` gets these statistics without its run file (:func:`with_failure_links`). Only
the prompts right before the edit (``right_before``: the unedited model scores the true answer
at least as high as the new target) are used, per group (``"all"`` and each prompt group):

* :func:`failure_links`: per factor (:data:`HEADLINE_FACTORS`) and failure measure
  (:data:`FAILURE_MEASURES`: pass/fail, log-odds drop, P(true) drop), Pearson r and Spearman rho
  with a 95% percentile interval of a record-clustered bootstrap (records, i.e. ``case_id``, drawn
  with replacement; the coefficient recomputed on the pooled prompts of the drawn records;
  seeded, so every statistic of a group shares the same draws), the Student-t p (prompts taken
  as independent), the bootstrap p, and the prompts and records used;
* :func:`max_vs_sum`: the paired record-clustered bootstrap of max minus summed drift to the
  subject's last token: the difference of their Pearson r with each failure measure and of their
  AUROC for pass/fail, the same drawn records for both factors, with a 95% interval, a
  two-sided bootstrap p-value and a verdict that follows the interval.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from attention_drift.reports.markdown import fmt, interval
from attention_drift.reports.stats import (
    BOOTSTRAP_SAMPLES,
    BOOTSTRAP_SEED,
    correlation_ci,
    distinct_records,
    paired_bootstrap,
    weighted_auroc,
    weighted_pearson,
)

HEADLINE_FACTORS = ("max_drift_subject_last", "sum_drift_subject_last", "max_kl")
"""The factors the reports show: the attention-mass factors (the paper's strongest, and its
sum) and the KL factor (the strongest on SmolLM2-135M)."""

FAILURE_MEASURES = {
    "failure": "1 when the edited model gets the prompt wrong (lp_new > lp_true), else 0 "
               "(Pearson r with it is the point-biserial r)",
    "logodds_drop": "log-odds(true vs new) before minus after the edit",
    "p_true_drop": "P(true) before minus after the edit (probability of the true answer)",
}
"""The failure measures, over the prompts right before the edit, and what each is."""

MEASURE_LABELS = {"failure": "pass/fail", "logodds_drop": "log-odds drop", "p_true_drop": "P(true) drop"}
"""Short names of :data:`FAILURE_MEASURES` for tables and figures."""

def comparison_label(name: str) -> str:
    """The readable name of a :func:`max_vs_sum` comparison key (``"pearson_p_true_drop"`` ->
    ``"Pearson r vs P(true) drop"``, ``"auroc_failure"`` -> ``"AUROC for pass/fail"``)."""
    if name == "auroc_failure":
        return "AUROC for pass/fail"
    return f"Pearson r vs {MEASURE_LABELS[name.removeprefix('pearson_')]}"


PAIR = ("max_drift_subject_last", "sum_drift_subject_last")
"""The factors :func:`max_vs_sum` compares: the max and the sum over heads of the drift to the
edited subject's last token."""


def _measure(sample: Mapping, name: str) -> float:
    return float(sample["flipped"]) if name == "failure" else float(sample["severity"][name])


def _groups(samples: Sequence[Mapping], groups: Sequence[str] | None) -> tuple[str, ...]:
    if groups is None:
        groups = list(dict.fromkeys(s["group"] for s in samples))
    return ("all", *(g for g in groups if g != "all"))


def _kept(samples: Sequence[Mapping], group: str) -> list[Mapping]:
    return [s for s in samples if s["right_before"] and group in ("all", s["group"])]


def _sizes(kept: Sequence[Mapping]) -> dict:
    return {"n_prompts": len(kept), "n_records": distinct_records(s["case_id"] for s in kept),
            "n_failed": sum(bool(s["flipped"]) for s in kept)}


def _settings(n_boot: int, seed: int, confidence: float) -> dict:
    return {"prompts": "right before the edit (lp_true >= lp_new)", "resampling": "records (case_id), with replacement",
            "interval": "percentile", "n_boot": n_boot, "seed": seed, "confidence": confidence}


def failure_links(samples: Sequence[Mapping], groups: Sequence[str] | None = None, *,
                  factors: Sequence[str] = HEADLINE_FACTORS, n_boot: int = BOOTSTRAP_SAMPLES,
                  seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> dict:
    """Pearson r and Spearman rho of each factor with each of :data:`FAILURE_MEASURES`, over the
    prompts right before the edit, per group (``"all"`` first, then ``groups``; default: the
    groups in the samples, in order).

    Each coefficient (:func:`~attention_drift.reports.stats.correlation_ci`) carries a percentile
    interval of ``n_boot`` record-clustered bootstrap draws (``case_id`` drawn with replacement,
    the coefficient of the pooled prompts of the drawn records; ``seed`` fixes the draws),
    ``p_value`` (Student-t, prompts as independent), ``p_bootstrap`` (the same draws), ``n``
    (prompts with finite values) and ``n_clusters`` (their records). Returns ``{"measures",
    "settings", "groups": {group: {"n_prompts", "n_records", "n_failed", "factors": {factor:
    {measure: {"pearson": ..., "spearman": ...}}}}}}``.
    """
    out = {"measures": dict(FAILURE_MEASURES), "settings": _settings(n_boot, seed, confidence), "groups": {}}
    for group in _groups(samples, groups):
        kept = _kept(samples, group)
        records = [s["case_id"] for s in kept]
        by_factor = {}
        for factor in factors:
            x = [float(s["factors"][factor]) for s in kept]
            by_factor[factor] = {
                m: {how: correlation_ci(x, [_measure(s, m) for s in kept], records, method=how,
                                        confidence=confidence, n_boot=n_boot, seed=seed).to_dict()
                    for how in ("pearson", "spearman")}
                for m in FAILURE_MEASURES}
        out["groups"][group] = {**_sizes(kept), "factors": by_factor}
    return out


def comparison_verdict(low: float, high: float, labels: tuple[str, str] = ("max", "sum")) -> str:
    """What a paired difference's interval says: ``"<a> predicts better"`` when it lies above 0,
    ``"<b> predicts better"`` below 0, ``"no detectable difference"`` when it holds 0,
    ``"not testable"`` when it is NaN."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not testable"
    if low > 0:
        return f"{labels[0]} predicts better"
    if high < 0:
        return f"{labels[1]} predicts better"
    return "no detectable difference"


def overall_verdict(verdicts: Mapping[str, str], labels: tuple[str, str] = ("max", "sum")) -> str:
    """One verdict over several comparisons' verdicts (:func:`comparison_verdict`): the shared
    one when all agree, else which comparisons say what."""
    distinct = list(dict.fromkeys(verdicts.values()))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"{v} on {', '.join(k for k, w in verdicts.items() if w == v)}" for v in distinct)


def max_vs_sum(samples: Sequence[Mapping], groups: Sequence[str] | None = None, *, pair: tuple[str, str] = PAIR,
               labels: tuple[str, str] = ("max", "sum"), n_boot: int = BOOTSTRAP_SAMPLES,
               seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> dict:
    """Paired record-clustered bootstrap of ``pair[0]`` minus ``pair[1]`` over the prompts right
    before the edit, per group: the difference of their Pearson r with each failure measure
    (``"pearson_<measure>"``) and of their AUROC for pass/fail (``"auroc_failure"``).

    Each draw takes records (``case_id``) with replacement and computes both factors' statistic on
    the same pooled prompts (:func:`~attention_drift.reports.stats.paired_bootstrap`), so the
    records' shared noise cancels in the difference; prompts with a non-finite value of either
    factor or the measure are dropped first. Each comparison: ``value`` (a - b), ``a``, ``b``,
    the 95% percentile interval, the two-sided bootstrap ``p_value`` and ``verdict``
    (:func:`comparison_verdict`); each group: ``verdict`` (:func:`overall_verdict`).
    """
    a, b = pair
    out = {"a": a, "b": b, "labels": list(labels), "settings": _settings(n_boot, seed, confidence), "groups": {}}
    for group in _groups(samples, groups):
        kept = _kept(samples, group)
        comparisons = {}
        for name, measure in [*((f"pearson_{m}", m) for m in FAILURE_MEASURES), ("auroc_failure", "failure")]:
            xa, xb, y = np.array([(s["factors"][a], s["factors"][b], _measure(s, measure)) for s in kept],
                                 dtype=np.float64).reshape(-1, 3).T
            ok = np.isfinite(xa) & np.isfinite(xb) & np.isfinite(y)
            xa, xb, y = xa[ok], xb[ok], y[ok]
            records = [s["case_id"] for s, k in zip(kept, ok) if k]
            if name.startswith("auroc"):
                positive = y > 0

                def stat_a(w, xa=xa, positive=positive):
                    return weighted_auroc(xa, positive, w)

                def stat_b(w, xb=xb, positive=positive):
                    return weighted_auroc(xb, positive, w)
            else:
                def stat_a(w, xa=xa, y=y):
                    return weighted_pearson(xa, y, w)

                def stat_b(w, xb=xb, y=y):
                    return weighted_pearson(xb, y, w)
            test = paired_bootstrap(stat_a, stat_b, int(y.size), records, name=f"{name} {labels[0]} - {labels[1]}",
                                    confidence=confidence, n_boot=n_boot, seed=seed).to_dict()
            comparisons[name] = {**test, "verdict": comparison_verdict(test["ci_low"], test["ci_high"], labels)}
        out["groups"][group] = {**_sizes(kept), "comparisons": comparisons,
                                "verdict": overall_verdict({comparison_label(k): c["verdict"]
                                                            for k, c in comparisons.items()}, labels)}
    return out


def with_failure_links(result: dict, *, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """``result`` (a ``drift.json`` content) with ``"failure_links"`` (:func:`failure_links`) and
    ``"max_vs_sum"`` (:func:`max_vs_sum`) added or refreshed from its ``"samples"`` over its
    ``"groups"``; every other key is kept as it is. A new dict; ``result`` is not changed."""
    samples, groups = result["samples"], result.get("groups")
    return {**result, "failure_links": failure_links(samples, groups, n_boot=n_boot, seed=seed),
            "max_vs_sum": max_vs_sum(samples, groups, n_boot=n_boot, seed=seed)}


def _cell(e: Mapping) -> str:
    return (f"{fmt(e['value'])} {interval(e)} (p {fmt(e['p_value'], '.2g')}, "
            f"boot p {fmt(e['p_bootstrap'], '.2g')})")


def failure_links_markdown(result: dict) -> str:
    """The markdown of ``result``'s ``"failure_links"`` and ``"max_vs_sum"`` (computed with
    :func:`with_failure_links` when absent): per group and factor the Pearson r and Spearman rho
    with each failure measure (record-clustered bootstrap 95% CI, Student-t p and bootstrap p,
    prompts / records), then the paired max-vs-sum test and its verdicts. Groups without
    prompts right before the edit are left out."""
    if "failure_links" not in result or "max_vs_sum" not in result:
        result = with_failure_links(result)
    links, paired = result["failure_links"], result["max_vs_sum"]
    st = links["settings"]
    rows = [f"Drift factors vs three failure measures over the prompts right before the edit: "
            f"{'; '.join(f'**{MEASURE_LABELS[m]}**: {d}' for m, d in links['measures'].items())}. "
            f"95% CIs: percentile, record-clustered bootstrap ({st['n_boot']} draws of records with replacement, "
            f"seed {st['seed']}); p: Student-t (prompts taken as independent); boot p: the same bootstrap.", "",
            "| group | factor | coefficient | " + " | ".join(f"vs {MEASURE_LABELS[m]}" for m in links["measures"])
            + " | prompts / records |", "|---|---|---|" + "---|" * len(links["measures"]) + "---:|"]
    for group, g in links["groups"].items():
        if not g["n_prompts"]:
            continue
        for factor, by_measure in g["factors"].items():
            for how, symbol in (("pearson", "Pearson r"), ("spearman", "Spearman ρ")):
                cells = [_cell(by_measure[m][how]) for m in links["measures"]]
                rows.append(f"| {group} | {factor} | {symbol} | " + " | ".join(cells)
                            + f" | {g['n_prompts']} / {g['n_records']} |")
    la, lb = paired["labels"]
    rows += ["", f"{la.capitalize()} vs {lb} ({paired['a']} − {paired['b']}): paired record-clustered bootstrap "
             f"(each draw's records used for both factors; {paired['settings']['n_boot']} draws, seed "
             f"{paired['settings']['seed']}), percentile 95% CI and two-sided bootstrap p; a verdict other than "
             "'no detectable difference' needs the CI to exclude 0 (each comparison on its own: no correction for "
             "the four comparisons per group).", "",
             f"| group | statistic | {la} | {lb} | {la} − {lb} [95% CI] | p | verdict | prompts / records |",
             "|---|---|---:|---:|---|---:|---|---:|"]
    for group, g in paired["groups"].items():
        if not g["n_prompts"]:
            continue
        for name, c in g["comparisons"].items():
            ci = f"[{fmt(c['ci_low'], '+.3f')}, {fmt(c['ci_high'], '+.3f')}]"
            rows.append(f"| {group} | {comparison_label(name)} | {fmt(c['a'])} | {fmt(c['b'])} | "
                        f"{fmt(c['value'], '+.3f')} {ci} | {fmt(c['p_value'], '.2g')} | {c['verdict']} | "
                        f"{c['n']} / {c['n_clusters']} |")
    rows += [""] + [f"Verdict, {group}: {g['verdict']}." for group, g in paired["groups"].items() if g["n_prompts"]]
    return "\n".join(rows)
