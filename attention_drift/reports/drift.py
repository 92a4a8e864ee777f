"""The drift report: every head's drift over records and how drift predicts specificity failure.

:func:`drift_report` turns measured records (:class:`~attention_drift.measure.drift.RecordDrift`,
in memory or read back from a run file) into a :class:`DriftReport`: per-head statistics, the top
drifting heads, correlations with failure, AUROCs and binned failure curves. Its
:meth:`DriftReport.to_dict` is ``drift.json`` (:func:`drift_from_lines` rebuilds it from run-file
lines) and :func:`drift_markdown` its markdown section; the figures are in
:mod:`attention_drift.views.report_figures`.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.measure.drift import (
    DEFAULT_GROUPS,
    DEFINITIONS,
    FACTORS,
    FAILURE_OUTCOMES,
    OUTCOMES,
    DriftError,
    DriftSample,
    RecordDrift,
    ranked_heads,
    rounded,
)
from attention_drift.reports.drift_failure import HEADLINE_FACTORS, failure_links_markdown, with_failure_links
from attention_drift.reports.markdown import fmt, interval
from attention_drift.reports.stats import (
    AurocEstimate,
    BinnedCurve,
    Correlation,
    auroc,
    auroc_ci,
    binned_curve,
    distinct_records,
    pearson,
    proportion,
    spearman,
)

DRIFT_FORMAT = "attention_drift.analysis.drift/1"


@dataclass(frozen=True)
class HeadStats:
    """Per-head statistics over prompts of one per-head quantity ([layer, head] each).

    ``mean`` and ``quantiles`` (at ``levels``) ignore NaN prompts; ``frac_above`` is the fraction
    of prompts whose value exceeds ``threshold``; ``sem`` the standard error of the mean
    (sample standard deviation / sqrt(n); NaN below 2 prompts).
    """

    name: str
    mean: Float[Tensor, "layer head"]
    quantiles: Float[Tensor, "level layer head"]
    levels: tuple[float, ...]
    frac_above: Float[Tensor, "layer head"]
    threshold: float
    sem: Float[Tensor, "layer head"] | None = None

    @classmethod
    def of(cls, name: str, values: Float[Tensor, "n layer head"], levels: tuple[float, ...],
           threshold: float) -> "HeadStats":
        valid = ~values.isnan()
        count = valid.sum(0).clamp(min=1)
        mean = torch.where(valid, values, 0.0).sum(0) / count
        quantiles = torch.nanquantile(values, torch.tensor(levels, dtype=values.dtype, device=values.device), dim=0)
        frac = ((values > threshold) & valid).sum(0) / count
        n = valid.sum(0)
        var = torch.where(valid, (values - mean) ** 2, 0.0).sum(0) / (n - 1).clamp(min=1)
        sem = (var / n.clamp(min=1)).sqrt().masked_fill(n < 2, math.nan)
        return cls(name, mean, quantiles, tuple(levels), frac.to(values.dtype), threshold, sem.to(values.dtype))

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean, as (layer, head, mean)."""
        return ranked_heads(self.mean, k)

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": self.mean.tolist(), "levels": list(self.levels),
                "quantiles": self.quantiles.tolist(), "threshold": self.threshold,
                "frac_above": self.frac_above.tolist(), "top": [list(t) for t in self.top()],
                "sem": None if self.sem is None else self.sem.tolist()}


def _pearson_spearman(correlations: dict, outcome: str) -> dict:
    """``{"pearson_<outcome>": ..., "spearman_<outcome>": ...}`` of one factor's correlations with ``outcome``."""
    return {f"{m}_{outcome}": correlations[outcome][m].to_dict() for m in ("pearson", "spearman")}


@dataclass(frozen=True)
class DriftReport:
    """Drift of every head over a data set and its link to specificity failure.

    Args:
        samples: one per scored prompt, in record order.
        head_stats: per-head statistics of the drift to the edited subject's last token
            (``"delta_subject_last"``), to all its tokens (``"delta_subject"``) and of the row KL
            (``"kl"``), over all samples.
        correlations: ``{group or "all": {factor: {outcome: {"pearson": C, "spearman": C}}}}``
            for the outcomes of :data:`OUTCOMES` over all samples (``"fails"``, wrong after the
            edit, as 0 / 1: point-biserial r).
        auroc: ``{group or "all": {factor: AUROC of the factor predicting "fails"}}``, all samples.
        curves: "fails" by quantile bin of each factor, over all samples.
        groups: the prompt groups measured.
        records: the number of records.
        subject_last_before, subject_last_after: mean over samples of every head's attention to
            the edited subject's last token before / inside the edit.
        correlations_right_before, auroc_right_before, curves_right_before: the same over the
            samples right before the edit only, with failure (:attr:`Outcome.flipped`) as the
            outcome (:data:`FAILURE_OUTCOMES`); the AUROCs with record-clustered bootstrap 95%
            intervals (:func:`~attention_drift.reports.stats.auroc_ci`). These are the reported ones.
    """

    samples: tuple[DriftSample, ...]
    head_stats: dict[str, HeadStats]
    correlations: dict[str, dict[str, dict[str, dict[str, Correlation]]]]
    auroc: dict[str, dict[str, float]]
    curves: dict[str, BinnedCurve]
    groups: tuple[str, ...] = field(default=())
    records: int = 0
    subject_last_before: Float[Tensor, "layer head"] | None = None
    subject_last_after: Float[Tensor, "layer head"] | None = None
    correlations_right_before: dict[str, dict[str, dict[str, dict[str, Correlation]]]] = field(default_factory=dict)
    auroc_right_before: dict[str, dict[str, AurocEstimate]] = field(default_factory=dict)
    curves_right_before: dict[str, BinnedCurve] = field(default_factory=dict)

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads whose attention to the edited subject's last token grows most on
        average, as (layer, head, mean drift)."""
        return self.head_stats["delta_subject_last"].top(k)

    def top_head_table(self, k: int = 10) -> list[dict]:
        """The :meth:`top_heads` with their mean attention before / after, median drift and
        fraction of prompts above the threshold (``drift.json``'s ``top_heads``)."""
        stats = self.head_stats["delta_subject_last"]
        median = stats.levels.index(0.5) if 0.5 in stats.levels else None
        return [{"layer": l, "head": h, "before": float(self.subject_last_before[l, h]),
                 "after": float(self.subject_last_after[l, h]), "drift": d,
                 "median_drift": None if median is None else float(stats.quantiles[median, l, h]),
                 "frac_above": float(stats.frac_above[l, h])}
                for l, h, d in self.top_heads(k)]

    def _chosen(self, group: str | None) -> list[DriftSample]:
        return [s for s in self.samples if group in (None, "all") or s.group == group]

    def wrong_after_rate(self, group: str | None = None) -> float:
        """Fraction of all prompts (of ``group``) the edited model gets wrong, including those the
        unedited model got wrong already (not the failure rate: see :meth:`failure`)."""
        chosen = self._chosen(group)
        return float("nan") if not chosen else sum(s.fails for s in chosen) / len(chosen)

    def failure(self, group: str | None = None) -> dict:
        """The failure rate over the prompts (of ``group``) right before the edit, with its 95%
        interval (:func:`~attention_drift.reports.stats.proportion`) and how many prompts it keeps and
        excludes: ``{"rate", "ci95", "half_width", "n_kept", "n_failed", "n_excluded_wrong_before",
        "n_prompts", "n_records", "n_records_kept"}``."""
        chosen = self._chosen(group)
        kept = [s for s in chosen if s.right_before]
        p = proportion([s.flipped for s in kept])
        return {"rate": p["accuracy"], "ci95": p["ci95"], "half_width": p["half_width"], "n_kept": len(kept),
                "n_failed": sum(s.flipped for s in kept), "n_excluded_wrong_before": len(chosen) - len(kept),
                "n_prompts": len(chosen), "n_records": distinct_records(s.case_id for s in chosen),
                "n_records_kept": distinct_records(s.case_id for s in kept)}

    def headline_right_before(self) -> dict:
        """Per group and :data:`HEADLINE_FACTORS` factor, over the prompts right before the edit:
        Pearson and Spearman correlations (95% Fisher-z intervals) with failure and with the
        log-odds drop, the AUROC of the factor for failure (record-clustered bootstrap 95%
        interval), and the prompts and records used."""
        out = {}
        for group in ("all", *self.groups):
            kept = [s for s in self._chosen(group) if s.right_before]
            out[group] = {}
            for factor in HEADLINE_FACTORS:
                c = self.correlations_right_before[group][factor]
                out[group][factor] = {**_pearson_spearman(c, "failure"), **_pearson_spearman(c, "logodds_drop"),
                                      "auroc": self.auroc_right_before[group][factor].to_dict(),
                                      "n_prompts": len(kept), "n_records": distinct_records(s.case_id for s in kept)}
        return out

    def headline(self) -> dict:
        """Per group, the correlations of the headline factors with "fails" (wrong after the
        edit, all prompts) and log-odds drop; the reported statistics are
        :meth:`headline_right_before`."""
        out = {}
        for group in ("all", *self.groups):
            out[group] = {}
            for factor in HEADLINE_FACTORS:
                c = self.correlations[group][factor]
                out[group][factor] = {**_pearson_spearman(c, "fails"), **_pearson_spearman(c, "logodds_drop"),
                                      "auroc": self.auroc[group][factor]}
        return out

    def markdown(self, title: str = "", top_k: int = 10) -> str:
        """The report's markdown section (:func:`drift_markdown` of :meth:`to_dict`)."""
        return drift_markdown(self.to_dict(top_k), title)

    def to_dict(self, top_k: int = 10) -> dict:
        """Everything as JSON-ready Python values (NaN stays float NaN): the content of
        ``drift.json`` (``top_k`` heads in ``"top_heads"``).

        Failure keys (their meanings are also written as ``"definitions"``): ``"failure"`` (per
        group :meth:`failure`: rate over prompts right before the edit, kept / excluded counts),
        ``"correlations_right_before"``, ``"auroc_right_before"``, ``"curves_right_before"``,
        ``"headline_right_before"`` (the reported statistics); ``"wrong_after_rate"`` (per group
        :meth:`wrong_after_rate`) and, with the same numbers, ``"failure_rate"``, kept under its
        old name for readers of older files; ``"correlations"``, ``"auroc"``, ``"curves"``,
        ``"headline"``: the all-prompt statistics of "fails" (wrong after the edit).
        ``"failure_links"``, ``"max_vs_sum"``: the record-clustered bootstrap statistics of
        :func:`~attention_drift.reports.drift_failure.with_failure_links` (three failure
        measures; the paired test of max vs summed drift).
        """
        every = ("all", *self.groups)
        return with_failure_links({
            "groups": list(self.groups),
            "n_samples": len(self.samples),
            "definitions": dict(DEFINITIONS),
            "failure": {g: self.failure(g) for g in every},
            "wrong_after_rate": {g: self.wrong_after_rate(g) for g in every},
            "failure_rate": {g: self.wrong_after_rate(g) for g in every},
            "samples": [s.to_dict() for s in self.samples],
            "head_stats": {k: v.to_dict() for k, v in self.head_stats.items()},
            "correlations": {
                g: {f: {s: {m: c.to_dict() for m, c in by_m.items()} for s, by_m in by_s.items()}
                    for f, by_s in by_f.items()}
                for g, by_f in self.correlations.items()
            },
            "auroc": self.auroc,
            "curves": {k: v.to_dict() for k, v in self.curves.items()},
            "top_heads": self.top_head_table(top_k),
            "subject_last_attention": {"before": rounded(self.subject_last_before).tolist(),
                                       "after": rounded(self.subject_last_after).tolist()},
            "records": self.records,
            "n_samples_by_group": {g: sum(s.group == g for s in self.samples) for g in self.groups},
            "records_by_group": {g: distinct_records(s.case_id for s in self._chosen(g)) for g in self.groups},
            "headline": self.headline(),
            "correlations_right_before": {
                g: {f: {o: {m: c.to_dict() for m, c in by_m.items()} for o, by_m in by_o.items()}
                    for f, by_o in by_f.items()}
                for g, by_f in self.correlations_right_before.items()
            },
            "auroc_right_before": {g: {f: a.to_dict() for f, a in by_f.items()}
                                   for g, by_f in self.auroc_right_before.items()},
            "curves_right_before": {k: v.to_dict() for k, v in self.curves_right_before.items()},
            "headline_right_before": self.headline_right_before(),
        })


def drift_report(
    records: Sequence[RecordDrift],
    groups: Sequence[str] = DEFAULT_GROUPS,
    *,
    threshold: float = 0.05,
    levels: tuple[float, ...] = (0.1, 0.5, 0.9),
    n_bins: int = 5,
) -> DriftReport:
    """The :class:`DriftReport` of measured records (:func:`~attention_drift.measure.drift.drift_record` results, or run-file
    lines read back with :meth:`RecordDrift.from_line`). ``threshold`` is the drift (attention
    mass change) above which a head counts in ``frac_above``; ``levels`` the per-head quantiles;
    ``n_bins`` the bins of the failure curves. The failure statistics use the prompts right
    before the edit only (:class:`Outcome`); the AUROC intervals resample records (fixed seed)."""
    records = [r for r in records if r is not None and r.samples]
    if not records:
        raise DriftError("no record with distract prompts containing its subject; nothing to report")
    samples = [s for r in records for s in r.samples]

    def cat(key: str) -> Tensor:
        return torch.cat([getattr(r, key).to(torch.float64) for r in records])

    before, after = cat("subject_last_before"), cat("subject_last_after")
    head_stats = {
        "delta_subject_last": HeadStats.of("delta_subject_last", after - before, levels, threshold),
        "delta_subject": HeadStats.of("delta_subject", cat("delta_subject"), levels, threshold),
        "kl": HeadStats.of("kl", cat("kl"), levels, threshold),
    }
    kept = [s for s in samples if s.right_before]
    correlations, aurocs, correlations_rb, aurocs_rb = {}, {}, {}, {}
    for group in ("all", *groups):
        chosen = [s for s in samples if group == "all" or s.group == group]
        correlations[group] = _correlations(chosen, OUTCOMES)
        aurocs[group] = {f: auroc([s.factors[f] for s in chosen], [s.fails for s in chosen]) for f in FACTORS}
        chosen = [s for s in chosen if s.right_before]
        correlations_rb[group] = _correlations(chosen, FAILURE_OUTCOMES)
        aurocs_rb[group] = {f: auroc_ci([s.factors[f] for s in chosen], [s.flipped for s in chosen],
                                        [s.case_id for s in chosen]) for f in FACTORS}
    return DriftReport(tuple(samples), head_stats, correlations, aurocs, _curves(samples, n_bins), tuple(groups),
                       len(records), before.nanmean(0), after.nanmean(0), correlations_rb, aurocs_rb,
                       _curves(kept, n_bins, failure=True))


def _correlations(samples: Sequence[DriftSample], outcomes: Sequence[str]) -> dict:
    return {f: {o: {"pearson": pearson([s.factors[f] for s in samples], [s.outcome(o) for s in samples]),
                    "spearman": spearman([s.factors[f] for s in samples], [s.outcome(o) for s in samples])}
                for o in outcomes}
            for f in FACTORS}


def _curves(samples: Sequence[DriftSample], n_bins: int, failure: bool = False) -> dict[str, BinnedCurve]:
    return {f: binned_curve([s.factors[f] for s in samples], [s.flipped if failure else s.fails for s in samples],
                            [s.severity["logodds_drop"] for s in samples], n_bins,
                            factor_name=f, severity_name="logodds_drop")
            for f in FACTORS}



def drift_from_lines(lines: Sequence[dict], groups: Sequence[str] = DEFAULT_GROUPS, *, top_k: int = 10,
                     threshold: float = 0.05) -> dict:
    """The ``drift.json`` content of run-file lines (:meth:`RecordDrift.to_line`; skipped records
    are left out): :func:`drift_report` of the records they hold."""
    records = [RecordDrift.from_line(line) for line in lines if line.get("samples")]
    if not records:
        raise DriftError("no record with distract prompts containing its subject; nothing to report")
    return drift_report(records, groups, threshold=threshold).to_dict(top_k)


def _failure_sentence(result: dict) -> str:
    """How many prompts the failure statistics keep, and the failure rate per group."""
    f = result["failure"]["all"]
    rates = ", ".join(
        f"{g} {fmt(v['rate'], '.2f')} [{fmt(v['ci95'][0], '.2f')}, {fmt(v['ci95'][1], '.2f')}] "
        f"({v['n_failed']} / {v['n_kept']})"
        for g, v in result["failure"].items() if v["n_kept"])
    wrong = ", ".join(f"{g} {fmt(v, '.2f')}" for g, v in result["wrong_after_rate"].items()
                      if g == "all" or result["n_samples_by_group"].get(g))
    return (f"Failure: a prompt the unedited model got right (P(true) ≥ P(new)) that the edited model gets wrong. "
            f"Prompts already wrong before the edit are excluded from every failure statistic: kept "
            f"{f['n_kept']} of {f['n_prompts']} prompts ({f['n_excluded_wrong_before']} excluded), from "
            f"{f['n_records_kept']} of {f['n_records']} records. Failure rate [95% CI] (failed / kept): {rates}. "
            f"(Wrong after the edit over all prompts, which counts the prompts wrong before too: {wrong}.)")


def drift_markdown(result: dict, title: str = "") -> str:
    """The drift section: sizes, the failure definition and rate, the top heads, and per group and
    :data:`HEADLINE_FACTORS` factor the Pearson and Spearman correlations
    (Fisher-z 95% CIs) with failure and with the log-odds drop and the AUROC for failure
    (record-clustered bootstrap 95% CI), over the prompts right before the edit; then the
    three-measure table with record-clustered CIs and the paired max-vs-sum test
    (:func:`~attention_drift.reports.drift_failure.failure_links_markdown`, computed from the
    samples when ``result`` predates them)."""
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
            cells = [f"{fmt(h[k]['r'])} {interval(h[k])}" for k in ("pearson_failure", "spearman_failure")]
            cells.append(f"{fmt(h['auroc']['value'])} {interval(h['auroc'])}")
            cells += [f"{fmt(h[k]['r'])} {interval(h[k])} (p {fmt(h[k]['p_value'], '.2g')})"
                      for k in ("pearson_logodds_drop", "spearman_logodds_drop")]
            rows.append(f"| {group} | {factor} | " + " | ".join(cells) + f" | {h['n_prompts']} / {h['n_records']} |")
    return "\n".join([*rows, "", failure_links_markdown(result)])
