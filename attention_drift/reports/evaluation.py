"""Tables and summaries of evaluation run files: what ``summarize``, ``compare`` and ``figures`` print.

Two kinds of interval, always labelled:

* ``ci95`` / ``half_width`` -- the paper's pooled normal interval: all prompts of all records
  pooled, ``1.96 * sqrt(p (1 - p) / n)`` with n prompts (ignores that prompts of one record
  are correlated; kept to compare with the paper);
* ``ci95_bootstrap`` -- a record-clustered bootstrap: records are resampled with replacement
  (:data:`N_BOOTSTRAP` times, fixed seed; :func:`attention_drift.reports.stats.bootstrap_values`) and the
  pooled accuracy recomputed; the 2.5 / 97.5 percentiles.

The field's metrics (:data:`~attention_drift.measure.field_metrics.METRICS`: NKL, token-level
accuracies) are means of per-prompt values, under ``"metrics"``: ``ci95`` / ``half_width`` the
normal interval over prompts (1.96 * std / sqrt(n)), ``ci95_bootstrap`` the same record-clustered
bootstrap of the pooled mean.

Two runs on the same data are compared on the records they share, paired
(:func:`paired_difference`): the difference of pooled accuracies with a record-clustered
paired bootstrap interval and p-value, McNemar's exact test on the prompts, and -- when the
first run has pre-edit scores -- the fraction of the first run's loss (pre minus post) that the
second run recovers; for the field's metrics the difference of pooled means with the same
paired bootstrap (:func:`paired_metric_difference`).
"""

import json
from collections.abc import Mapping, Sequence

import numpy as np

from attention_drift.reports import stats
from attention_drift.measure.evaluate import (GROUPS, SUITE_GROUPS, RecordScores, aggregate, aggregate_metrics,
                                               avg_s, fluency_stats)
from attention_drift.measure.field_metrics import METRICS
from attention_drift.core.jsonl import Run

COMPARE_GROUPS = ("efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "relation",
                  "distract_relation")
"""The groups of the paper's main table, in its column order."""
SHOWN_GROUPS = COMPARE_GROUPS + SUITE_GROUPS
"""What :func:`compare` pairs and :func:`table_markdown` shows: the paper's main table, then the
distract suite's groups (``evaluate --suite``); a group no run has is left out."""
N_BOOTSTRAP = stats.BOOTSTRAP_SAMPLES


# --- per-record counts ----------------------------------------------------------------------

def _key(line: dict) -> str:
    return json.dumps(line["case_id"])


def _correct(line: dict, phase: str, group: str) -> list[bool] | None:
    scores = line.get(phase, {}).get("groups", {}).get(group, {}).get("scores")
    return None if not scores else [bool(row[2]) for row in scores]


def _values(line: dict, phase: str, metric: str) -> list[float] | None:
    values = (line.get(phase, {}).get("metrics") or {}).get(metric, {}).get("values")
    return None if not values else [float(v) for v in values]


def _sums(lines: Sequence[dict], phase: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the metric's values, prompts) per record that has the metric in ``phase``."""
    values = [v for v in (_values(line, phase, metric) for line in lines) if v]
    return np.array([sum(v) for v in values], dtype=float), np.array([len(v) for v in values], dtype=float)


def _counts(lines: Sequence[dict], phase: str, group: str) -> tuple[np.ndarray, np.ndarray]:
    """(correct prompts, prompts) per record that has the group in ``phase``."""
    flags = [f for f in (_correct(line, phase, group) for line in lines) if f]
    return np.array([sum(f) for f in flags], dtype=float), np.array([len(f) for f in flags], dtype=float)


def _ratio_values(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``sum(numerator) / sum(denominator)`` over records resampled with replacement (one array
    entry per record), where the resampled denominator is positive."""
    def statistic(weights):
        den = weights @ denominator
        return np.where(den > 0, (weights @ numerator) / np.where(den > 0, den, 1.0), np.nan)

    return stats.bootstrap_values(statistic, len(denominator), n_boot=N_BOOTSTRAP)


def _interval(values: np.ndarray) -> list[float] | None:
    return None if values.size == 0 else list(stats.percentile_interval(values))


def bootstrap_ci(correct: np.ndarray, n: np.ndarray) -> tuple[float, float] | None:
    """Record-clustered bootstrap 95% interval of the pooled accuracy ``sum(correct) / sum(n)``
    (or pooled mean: ``correct`` the per-record sums of values)."""
    interval = _interval(_ratio_values(correct, n))
    return None if interval is None else tuple(interval)


# --- one run --------------------------------------------------------------------------------

def summary(run: Run, *, per_record: bool = False) -> dict:
    """The summary dict of a run (shape in :mod:`attention_drift.cli`'s docstring): per group and
    phase the paper's pooled interval (``ci95``) and the record-clustered bootstrap
    (``ci95_bootstrap``); per field metric and phase its mean with the same two intervals (an
    empty ``"metrics"`` for run files written before they existed)."""
    phases = {}
    for phase in ("pre", "post"):
        lines = [line for line in run.records if phase in line]
        if lines:
            phases[phase] = (lines, [RecordScores.from_json(line["case_id"], line[phase]) for line in lines])
    groups: dict[str, dict] = {}
    metrics: dict[str, dict] = {}
    avg: dict[str, float | None] = {}
    for phase, (lines, scores) in phases.items():
        group_stats = aggregate(scores, per_record=per_record)
        for name, s in group_stats.items():
            entry = s.to_json()
            counts = _counts(lines, phase, name)
            ci = bootstrap_ci(*counts)
            entry["ci95_bootstrap"] = None if ci is None else list(ci)
            entry["n_records"] = len(counts[1])
            groups.setdefault(name, {})[phase] = entry
        for name, s in aggregate_metrics(scores, per_record=per_record).items():
            entry = s.to_json()
            sums = _sums(lines, phase, name)
            ci = bootstrap_ci(*sums)
            entry["ci95_bootstrap"] = None if ci is None else list(ci)
            entry["n_records"] = len(sums[1])
            metrics.setdefault(name, {})[phase] = entry
        fl = fluency_stats(scores, per_record=per_record)
        if fl is not None:
            groups.setdefault("fluency", {})[phase] = fl.to_json()
        avg[phase] = avg_s(group_stats)
    seconds = [line["edit_seconds"] for line in run.records if line.get("edit_seconds") is not None]
    meta = {
        "model": run.meta.get("model"), "method": run.meta.get("method"), "variant": run.meta.get("variant"),
        "data": run.meta.get("data"), "records": len(run.records), "per_record": per_record,
        "seconds_per_edit": sum(seconds) / len(seconds) if seconds else None, "avg_s": avg,
        "edit_batch": int(run.meta.get("edit_batch", 1)),
    }
    return {"groups": groups, "metrics": {m: metrics[m] for m in METRICS if m in metrics}, "meta": meta}


def _pct(stats: dict | None) -> str:
    if stats is None:
        return "–"
    return f"{100 * stats['accuracy']:.1f} ± {100 * stats['half_width']:.1f}"


def _boot(stats: dict | None) -> str:
    ci = None if stats is None else stats.get("ci95_bootstrap")
    return "–" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _prob(stats: dict | None) -> str:
    return "–" if stats is None else f"{stats['mean_p_right']:.3g}"


def _metric_label(name: str) -> str:
    metric = METRICS[name]
    return (f"{name} ({metric.abbrev})" if metric.abbrev else name) + (" ↓" if metric.lower_is_better else "")


def _num(name: str, x: float, *, signed: bool = False) -> str:
    """A metric's number: NKL in nats (3 significant digits), accuracies in % (1 decimal)."""
    sign = "+" if signed else ""
    return f"{x:{sign}.3g}" if METRICS[name].lower_is_better else f"{100 * x:{sign}.1f}"


def _metric_mean(name: str, stats: dict | None) -> str:
    return "–" if stats is None else f"{_num(name, stats['mean'])} ± {_num(name, stats['half_width'])}"


def _metric_boot(name: str, stats: dict | None) -> str:
    ci = None if stats is None else stats.get("ci95_bootstrap")
    return "–" if ci is None else f"[{_num(name, ci[0])}, {_num(name, ci[1])}]"


def metrics_markdown(metrics: Mapping[str, dict]) -> str:
    """The field's metrics of a :func:`summary` as a markdown table ("" when there are none)."""
    if not metrics:
        return ""
    rows = ["| field metric | n (records / prompts) | pre mean ± normal CI | pre bootstrap CI | "
            "post mean ± normal CI | post bootstrap CI |", "|---|---:|---:|---:|---:|---:|"]
    for name, by_phase in metrics.items():
        pre, post = by_phase.get("pre"), by_phase.get("post")
        any_ = post or pre
        rows.append(f"| {_metric_label(name)} | {any_['n_records']} / {any_['n']} | {_metric_mean(name, pre)} | "
                    f"{_metric_boot(name, pre)} | {_metric_mean(name, post)} | {_metric_boot(name, post)} |")
    rows += ["", "NKL in nats (KL(post || pre) of the next-token distribution on the distract-neighbourhood "
             "prompts, CounterFact+; lower is better), the token accuracies in %, EasyEdit's teacher-forced "
             "definitions; NKL and locality token accuracy compare with the unedited model, so they have no "
             "pre-edit value (see attention_drift.measure.field_metrics.METRICS)."]
    return "\n".join(rows)


def markdown(result: dict) -> str:
    """A :func:`summary` as a markdown table (percentages, 1 decimal)."""
    meta = result["meta"]
    seconds = meta["seconds_per_edit"]
    pooled = "per-record mean" if meta["per_record"] else "pooled over prompts"
    batch = meta.get("edit_batch", 1)
    head = (f"model {meta['model']} · method {meta['method']} · {meta['records']} records · {pooled}"
            + (f" · batch editing, {batch} facts per update" if batch > 1 else "")
            + (f" · {seconds:.1f} s/edit" + (" (per fact)" if batch > 1 else "") if seconds is not None else ""))
    rows = [head, "", "| group | n | pre acc ± normal CI | pre bootstrap CI | post acc ± normal CI | "
            "post bootstrap CI | pre/post mean P(right) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, group in GROUPS.items():
        if name not in result["groups"]:
            continue
        pre, post = result["groups"][name].get("pre"), result["groups"][name].get("post")
        n = (pre or post)["n"]
        label = f"{name} ({group.abbrev})" if group.abbrev else name
        rows.append(f"| {label} | {n} | {_pct(pre)} | {_boot(pre)} | {_pct(post)} | {_boot(post)} | "
                    f"{_prob(pre)} / {_prob(post)} |")
    if "fluency" in result["groups"]:
        fl = result["groups"]["fluency"]
        cell = {p: (f"{100 * fl[p]['ngram_entropy']:.1f}" if p in fl else "–") for p in ("pre", "post")}
        rows.append(f"| fluency (FL, n-gram entropy x100) | {(fl.get('pre') or fl.get('post'))['n']} | "
                    f"{cell['pre']} | | {cell['post']} | | |")
    avg = meta["avg_s"]
    if any(v is not None for v in avg.values()):
        cells = ", ".join(f"{p} {100 * v:.1f}" if v is not None else f"{p} –" for p, v in avg.items())
        rows += ["", f"Avg.S (harmonic mean of ES, PS, NS, RS, DNS): {cells}"]
    if result.get("metrics"):
        rows += ["", metrics_markdown(result["metrics"])]
    rows += ["", "normal CI: the paper's pooled interval 1.96·sqrt(p(1-p)/n) over prompts; bootstrap CI: "
             f"records resampled {N_BOOTSTRAP} times (95%)."]
    return "\n".join(rows)


# --- two runs, paired -----------------------------------------------------------------------

def shared_records(runs: Mapping[str, Run]) -> set[str]:
    """The case_ids (as JSON) present in every run."""
    keys = None
    for run in runs.values():
        ids = {_key(line) for line in run.records}
        keys = ids if keys is None else keys & ids
    return keys or set()


def _paired(a: Run, b: Run, group: str) -> list[tuple[list[bool] | None, list[bool], list[bool]]]:
    """Per record both runs scored on ``group`` (same prompts): (a's pre-edit flags or None,
    a's post-edit flags, b's post-edit flags)."""
    by_b = {_key(line): line for line in b.records}
    rows = []
    for line in a.records:
        other = by_b.get(_key(line))
        fa = _correct(line, "post", group)
        fb = None if other is None else _correct(other, "post", group)
        if fa and fb and len(fa) == len(fb):
            pre = _correct(line, "pre", group)
            rows.append((pre if pre and len(pre) == len(fa) else None, fa, fb))
    return rows


def mcnemar_p(flags_a: Sequence[bool], flags_b: Sequence[bool]) -> float:
    """McNemar's exact test (two-sided binomial on the discordant prompts)."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(flags_a, flags_b))
    only_b = sum(y and not x for x, y in zip(flags_a, flags_b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_difference(a: Run, b: Run, group: str) -> dict | None:
    """Post-edit accuracy of ``b`` minus ``a`` on ``group``, over the records and prompts both scored.

    Returns ``{"diff", "ci95", "p_value", "mcnemar_p", "n_records", "n_prompts", "recovered"}``:
    ``diff`` is the difference of pooled accuracies (fractions); ``ci95`` its record-clustered
    paired bootstrap interval (both runs resampled with the same records); ``p_value`` the
    two-sided bootstrap p-value of no difference (share of resampled differences at least as
    far from the observed one as the observed one is from 0; floor 1 / :data:`N_BOOTSTRAP`);
    ``mcnemar_p`` McNemar's exact test on the prompts (ignores clustering). ``recovered``:
    ``{"fraction", "ci95"}`` with fraction ``(b_post - a_post) / (a_pre - a_post)``, the share of
    ``a``'s loss that ``b`` wins back (None unless ``a`` has pre-edit scores on every paired
    record and lost at least one prompt).
    """
    rows = _paired(a, b, group)
    if not rows:
        return None
    ca, cb = (np.array([sum(r[i]) for r in rows], dtype=float) for i in (1, 2))
    n = np.array([len(r[1]) for r in rows], dtype=float)
    diff = float((cb.sum() - ca.sum()) / n.sum())
    out = {"diff": diff, "ci95": None, "p_value": None, "n_records": len(rows), "n_prompts": int(n.sum()),
           "mcnemar_p": mcnemar_p([x for r in rows for x in r[1]], [y for r in rows for y in r[2]]),
           "recovered": None}
    boot = _ratio_values(cb - ca, n)
    if boot.size:
        out["ci95"] = _interval(boot)
        extreme = float(np.mean(np.abs(boot - diff) >= abs(diff))) if diff != 0 else 1.0
        out["p_value"] = max(extreme, 1 / N_BOOTSTRAP)
    if all(r[0] is not None for r in rows):
        cp = np.array([sum(r[0]) for r in rows], dtype=float)
        if cp.sum() - ca.sum() >= 1:
            out["recovered"] = {"fraction": float((cb.sum() - ca.sum()) / (cp.sum() - ca.sum())),
                                "ci95": _interval(_ratio_values(cb - ca, cp - ca))}
    return out


def paired_metric_difference(a: Run, b: Run, metric: str) -> dict | None:
    """Post-edit mean of field metric ``metric`` of ``b`` minus ``a``, over the records both
    scored with the same number of prompts: the keys of :func:`paired_difference`, ``diff`` the
    difference of pooled means with its record-clustered paired bootstrap ``ci95`` and
    ``p_value``; ``mcnemar_p`` and ``recovered`` are None (no flags)."""
    by_b = {_key(line): line for line in b.records}
    rows = []
    for line in a.records:
        other = by_b.get(_key(line))
        va = _values(line, "post", metric)
        vb = None if other is None else _values(other, "post", metric)
        if va and vb and len(va) == len(vb):
            rows.append((va, vb))
    if not rows:
        return None
    sa, sb = (np.array([sum(r[i]) for r in rows], dtype=float) for i in (0, 1))
    n = np.array([len(r[0]) for r in rows], dtype=float)
    diff = float((sb.sum() - sa.sum()) / n.sum())
    out = {"diff": diff, "ci95": None, "p_value": None, "n_records": len(rows), "n_prompts": int(n.sum()),
           "mcnemar_p": None, "recovered": None}
    boot = _ratio_values(sb - sa, n)
    if boot.size:
        out["ci95"] = _interval(boot)
        extreme = float(np.mean(np.abs(boot - diff) >= abs(diff))) if diff != 0 else 1.0
        out["p_value"] = max(extreme, 1 / N_BOOTSTRAP)
    return out


def compare(runs: Mapping[str, Run], *, shared: bool = True, groups: Sequence[str] = SHOWN_GROUPS,
            pairs: Sequence[tuple[str, str]] | None = None, metrics: Sequence[str] = tuple(METRICS)) -> dict:
    """Several runs side by side: ``{"runs": {label: summary}, "paired": {"A -> B": {group: ...}}}``.

    With ``shared`` every summary is restricted to the case_ids all runs have. ``paired`` holds,
    for each pair ``(A, B)`` of ``pairs`` (default: every ordered pair, first -> later),
    :func:`paired_difference` of each group and :func:`paired_metric_difference` of each field
    metric in ``metrics`` (post-edit scores; always on the shared records of that pair).
    """
    keys = shared_records(runs) if shared else None
    restricted = {label: Run(run.meta, [line for line in run.records if keys is None or _key(line) in keys])
                  for label, run in runs.items()}
    labels = list(runs)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    paired = {}
    for first, second in pairs:
        entry = {g: paired_difference(runs[first], runs[second], g) for g in groups}
        entry |= {m: paired_metric_difference(runs[first], runs[second], m) for m in metrics}
        paired[f"{first} -> {second}"] = {g: v for g, v in entry.items() if v is not None}
    return {"runs": {label: summary(run) for label, run in restricted.items()}, "paired": paired}


def tradeoff(runs: Mapping[str, Run], baseline: str, *, group: str = "distract_neighborhood",
             cost: str = "paraphrase") -> list[dict]:
    """Per run other than ``baseline``, against it on their shared records (:func:`paired_difference`):
    the fraction of the baseline's ``group`` loss the run wins back, and the run's ``cost``
    accuracy minus the baseline's (both with paired bootstrap CIs), plus its post-edit efficacy.

    Returns ``[{"variant", "n_records", "recovered", "recovered_ci95", "cost_diff", "cost_ci95",
    "efficacy"}]``, fractions; runs without a recovery (no baseline loss) are left out.
    """
    if baseline not in runs:
        raise KeyError(f"baseline run {baseline!r} is not among {sorted(runs)}")
    points = []
    for name, run in runs.items():
        if name == baseline:
            continue
        won, paid = paired_difference(runs[baseline], run, group), paired_difference(runs[baseline], run, cost)
        if won is None or won["recovered"] is None or paid is None:
            continue
        efficacy = summary(run)["groups"].get("efficacy", {}).get("post")
        points.append({"variant": name, "n_records": won["n_records"],
                       "recovered": won["recovered"]["fraction"], "recovered_ci95": won["recovered"]["ci95"],
                       "cost_diff": paid["diff"], "cost_ci95": paid["ci95"],
                       "efficacy": None if efficacy is None else efficacy["accuracy"]})
    return points


def _row(label: str, result: dict, phase: str, groups: Sequence[str], fluency: bool,
         metrics: Sequence[str] = ()) -> str:
    batch = result["meta"].get("edit_batch", 1) if phase == "post" else 1
    cells = [label + (f" (batches of {batch})" if batch > 1 else ""), str(result["meta"]["records"])]
    cells += [_pct(result["groups"].get(g, {}).get(phase)) for g in groups]
    cells += [_metric_mean(m, result.get("metrics", {}).get(m, {}).get(phase)) for m in metrics]
    if fluency:
        f = result["groups"].get("fluency", {}).get(phase)
        cells.append(f"{100 * f['ngram_entropy']:.1f}" if f else "–")
    seconds = result["meta"]["seconds_per_edit"]
    cells.append(f"{seconds:.1f}" if seconds is not None and phase == "post" else "–")
    return "| " + " | ".join(cells) + " |"


def table_markdown(summaries: Mapping[str, dict], groups: Sequence[str] = SHOWN_GROUPS) -> str:
    """Rows: the first run's pre-edit scores, then each run's post-edit scores (pooled, ± the
    paper's normal half-width), then the field's metrics any run has (mean ± normal half-width;
    NKL in nats, accuracies in %). A batch-editing run's label says its batch size; its s/edit is
    per fact."""
    groups = [g for g in groups if any(g in r["groups"] for r in summaries.values())]
    metrics = [m for m in METRICS if any(m in r.get("metrics", {}) for r in summaries.values())]
    fluency = any("fluency" in r["groups"] for r in summaries.values())
    head = ["run", "records"] + [f"{g} ({GROUPS[g].abbrev})" if GROUPS[g].abbrev else g for g in groups]
    head += [_metric_label(m) for m in metrics]
    head += (["FL"] if fluency else []) + ["s/edit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(summaries.values()))
    rows.append(_row("pre-edit", first, "pre", groups, fluency, metrics))
    rows += [_row(label, result, "post", groups, fluency, metrics) for label, result in summaries.items()
             if _edited(result)]
    return "\n".join(rows) + "\n\n" + sizes_markdown(summaries, groups)


def _edited(result: dict) -> bool:
    """Whether a :func:`summary` has post-edit scores (a ``--method none`` run has only its pre-edit row)."""
    return any("post" in entry for entry in result["groups"].values())


def group_sizes(result: dict, phase: str, groups: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{group: (records, prompts)}`` of one phase of a :func:`summary`: the records that have
    prompts of the group and the prompts scored, counted from the run's lines."""
    out = {}
    for g in groups:
        entry = result["groups"].get(g, {}).get(phase)
        if entry and "n" in entry:
            out[g] = (entry.get("n_records"), entry["n"])
    return out


def sizes_markdown(summaries: Mapping[str, dict], groups: Sequence[str] = SHOWN_GROUPS) -> str:
    """The n behind each column of :func:`table_markdown`, taken from the runs: ``records /
    prompts`` per group, once when every row has the same, else per row."""
    rows = {"pre-edit": group_sizes(next(iter(summaries.values())), "pre", groups)}
    rows |= {label: group_sizes(result, "post", groups) for label, result in summaries.items() if _edited(result)}

    def text(sizes):
        return ", ".join(f"{GROUPS[g].abbrev or g} {r if r is not None else '?'} / {p}" for g, (r, p) in sizes.items())

    if len({tuple(sorted(s.items())) for s in rows.values()}) == 1:
        return f"n (records / prompts) per column, every row: {text(rows['pre-edit'])}."
    return "n (records / prompts) per column: " + "; ".join(f"{label}: {text(s)}" for label, s in rows.items()) + "."


def _points(x: float | None, name: str = "") -> str:
    if x is None:
        return "–"
    return _num(name, x, signed=True) if name in METRICS else f"{100 * x:+.1f}"


def paired_markdown(paired: Mapping[str, Mapping[str, dict]]) -> str:
    """One row per pair and group (or field metric): difference (points; NKL in nats) with its
    paired bootstrap CI and p-values, and the fraction of the first run's loss recovered."""
    rows = ["| pair | group | records / prompts | diff (points) | paired bootstrap 95% CI | p (bootstrap) | "
            "p (McNemar) | loss recovered [95% CI] |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for pair, by_group in paired.items():
        for group, d in by_group.items():
            ci = "–" if d["ci95"] is None else f"[{_points(d['ci95'][0], group)}, {_points(d['ci95'][1], group)}]"
            p = "–" if d["p_value"] is None else f"{d['p_value']:.3g}"
            rec = d.get("recovered")
            rec_cell = "–"
            if rec is not None:
                rec_cell = f"{100 * rec['fraction']:.0f}%"
                if rec["ci95"] is not None:
                    rec_cell += f" [{100 * rec['ci95'][0]:.0f}, {100 * rec['ci95'][1]:.0f}]"
            mcnemar = "–" if d.get("mcnemar_p") is None else f"{d['mcnemar_p']:.3g}"
            label = _metric_label(group) if group in METRICS else group
            rows.append(f"| {pair} | {label} | {d['n_records']} / {d['n_prompts']} | {_points(d['diff'], group)} | "
                        f"{ci} | {p} | {mcnemar} | {rec_cell} |")
    return "\n".join(rows)


def compare_markdown(result: dict) -> str:
    """A :func:`compare` result: the side-by-side table, then the paired tests."""
    parts = [table_markdown(result["runs"])]
    if result.get("paired") and not any(result["paired"].values()):
        unedited = [label for label, r in result["runs"].items() if r["meta"]["method"] == "none"]
        reason = (f"the run {', '.join(f'`{u}`' for u in unedited)} made no edit (`--method none`), so it has no "
                  "post-edit scores; its pre-edit scores are the table's pre-edit row" if unedited
                  else "the runs share no scored records")
        parts += ["", f"No paired tests: they compare post-edit scores on shared records, and {reason}."]
    elif result.get("paired"):
        parts += ["", "Paired on shared records (second minus first run, post-edit):", "",
                  paired_markdown(result["paired"])]
    return "\n".join(parts)
