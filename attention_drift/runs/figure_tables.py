"""The figures made from evaluation run files (``attention-drift evaluate``): the prevalence of
specificity failure, the main table of editors with and without SADR, and the SADR ablations.
Each item takes ``{variant: run file}`` and returns its numbers (the tables of
:func:`attention_drift.reports.evaluation.compare`), markdown, files and n, for
:func:`attention_drift.runs.figures.run_figures`."""

from collections.abc import Sequence
from pathlib import Path

from attention_drift.reports.evaluation import COMPARE_GROUPS

WEIGHTS = {"rome": 0.0, "rome-sadr": 0.01, "rome-sadr-w0.1": 0.1, "rome-sadr-w1": 1.0}
"""The SADR weight sweep on ROME (0: plain ROME; 0.01: the published weight)."""
ABLATION_FAMILIES = {
    "selection": ("rome", "rome-sadr", "rome-sadr-all", "rome-sadr-distract", "rome-sadr-distract-w0.1",
                  "rome-sadr-distract-only-w1", "rome-sadr-distract-only-w10"),
    "layers": ("rome", "rome-sadr", "rome-sadr-lower", "rome-sadr-upper"),
}
SHOWN = COMPARE_GROUPS


def _summaries(runs: dict[str, Path], names: Sequence[str], *, shared: bool,
               pairs: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    """``{"runs": {label: summary}, "paired": ...}`` of the named runs present, with the paired
    tests of those ``pairs`` whose runs are both present (see :func:`report.compare`)."""
    from attention_drift.core.jsonl import read_run
    from attention_drift.reports.evaluation import compare

    present = [n for n in names if n in runs]
    pairs = [(a, b) for a, b in pairs if a in present and b in present]
    return compare({n: read_run(runs[n]) for n in present}, shared=shared, pairs=pairs) if present else {}


def _against(base: str, names: Sequence[str]) -> list[tuple[str, str]]:
    return [(base, n) for n in names if n != base]


def _row(summary: dict, phase: str = "post") -> dict:
    """``{group: {accuracy, ci95, n}}`` (and fluency) of one phase of a summary."""
    row = {g: {k: v[phase].get(k) for k in ("accuracy", "ci95", "n", "n_records", "half_width")}
           for g, v in summary["groups"].items() if phase in v and "accuracy" in v[phase]}
    fluency = summary["groups"].get("fluency", {}).get(phase)
    if fluency:
        row["fluency"] = fluency
    return row


def _table(compared: dict) -> tuple[dict, str]:
    """(numbers, markdown) of a :func:`_summaries` result: the first run's pre-edit row, each
    post-edit row, and the paired tests."""
    from attention_drift.reports.evaluation import compare_markdown

    if not compared:
        return {}, ""
    summaries = compared["runs"]
    first = next(iter(summaries.values()))
    rows = {"pre-edit": _row(first, "pre")} | {n: _row(s) for n, s in summaries.items()}
    records = {"pre-edit": first["meta"]["records"]} | {n: s["meta"]["records"] for n, s in summaries.items()}
    seconds = {n: s["meta"]["seconds_per_edit"] for n, s in summaries.items()}
    numbers = {"rows": rows, "records": records, "seconds_per_edit": seconds, "paired": compared["paired"]}
    return numbers, compare_markdown(compared)


def _sizes(numbers: dict) -> dict:
    """The n of a :func:`_table` result's figure: records per run, and per run and group the
    records that have the group's prompts and the prompts."""
    def per_group(key):
        return {run: {g: v[key] for g, v in row.items() if isinstance(v, dict) and key in v}
                for run, row in numbers["rows"].items()}

    return {"records": dict(numbers["records"]), "group_records": per_group("n_records"), "prompts": per_group("n")}


def _records_text(numbers: dict, groups: Sequence[str] | None = None) -> str:
    """The n of a figure from its data: ``"100 records per run"`` (each run's count when they
    differ) and, with ``groups``, the records / prompts behind each group's bars (per run where
    the runs differ)."""
    counts = numbers["records"]
    text = (f"{next(iter(counts.values()))} records per run" if len(set(counts.values())) == 1
            else "records " + ", ".join(f"{run} {n}" for run, n in counts.items()))
    if not groups:
        return text
    from attention_drift.measure.evaluate import GROUPS

    parts = []
    for g in groups:
        sizes = {(v[g].get("n_records"), v[g]["n"]) for v in numbers["rows"].values() if g in v}
        if not sizes:
            continue
        shown = " or ".join(f"{r if r is not None else '?'} / {p}" for r, p in sorted(sizes, key=str))
        parts.append(f"{GROUPS[g].abbrev or g.replace('_', ' ')} {shown}")
    return f"{text}; records / prompts: " + ", ".join(parts)


def _save(fig, out: Path, name: str, png: bool) -> list[str]:
    from attention_drift.views.plots import save_figure

    return save_figure(fig, out / name, png)


def _editors() -> list[str]:
    from attention_drift.runs.variants import editor_names

    return list(editor_names())


def _main() -> list[str]:
    """Every editor, then the editor with the published SADR and with SADR+ (``-sadr-plus``)."""
    return [name for method in _editors() for name in (method, f"{method}-sadr", f"{method}-sadr-plus")]


def _variant_kind(run: str) -> str:
    """The main table's legend: the unedited model, an editor alone, with the published SADR, with SADR+."""
    if run == "pre-edit":
        return "unedited"
    return "+ SADR+" if run.endswith("-sadr-plus") else "+ published SADR" if run.endswith("-sadr") else "editor alone"


def prevalence(runs, out: Path, png: bool) -> dict:
    from attention_drift.views import plots

    summaries = _summaries(runs, _editors(), shared=False)
    if not summaries:
        return {}
    numbers, md = _table(summaries)
    groups = ("neighborhood", "distract_neighborhood", "relation", "distract_relation")
    bars = {label: {g: row[g] for g in groups if g in row} for label, row in numbers["rows"].items()}
    fig = plots.metric_bars(bars, f"Specificity failure: plain vs distract prompts (95% CI) · {_records_text(numbers, groups)}",
                            metrics=list(groups))
    return {"numbers": numbers, "markdown": md, "files": _save(fig, out, "prevalence", png),
            "n": {"prevalence": _sizes(numbers)}}


def main_table(runs, out: Path, png: bool) -> dict:
    from attention_drift.views import plots

    pairs = [pair for m in _editors()
             for pair in ((m, f"{m}-sadr"), (m, f"{m}-sadr-plus"), (f"{m}-sadr", f"{m}-sadr-plus"))]
    pairs += [("rome", m) for m in _editors() if m != "rome"]  # which editor fails least, paired against ROME
    summaries = _summaries(runs, _main(), shared=False, pairs=pairs)
    if not summaries:
        return {}
    numbers, md = _table(summaries)
    dots = {label: {g: row[g] for g in SHOWN if g in row} for label, row in numbers["rows"].items()}
    fig = plots.metric_dots(dots, f"Editors with and without SADR (95% CI) · {_records_text(numbers, SHOWN)}",
                            metrics=list(SHOWN), series=_variant_kind)
    result = {"numbers": numbers, "markdown": md, "files": _save(fig, out, "main_table", png),
              "n": {"main_table": _sizes(numbers)}}
    if len(set(numbers["records"].values())) > 1:  # runs of unequal size: also the table on shared records
        shared_numbers, shared_md = _table(_summaries(runs, _main(), shared=True, pairs=pairs))
        result["shared"] = {"numbers": shared_numbers, "markdown": shared_md}
    return result


ABLATION_MIN_RECORDS = 30
"""Shared records an ablation needs to be drawn; a smaller one is listed as not drawn, not shown small."""


def _too_small(numbers: dict, name: str, result: dict, min_records: int) -> bool:
    n = min(numbers["records"].values())
    if n >= min_records:
        return False
    result["not_drawn"][name] = {"records": n, "needed": min_records}
    return True


def _weight_label(name: str, weight: float) -> str:
    """The weight sweep's x label of a run: ``"0 (ROME)"``, ``"0.01 (published)"``, ``"0.1"``."""
    if weight == 0:
        return "0 (ROME)"
    return f"{weight:g} (published)" if name == "rome-sadr" else f"{weight:g}"


def _ci_percent(entry: dict) -> list[float] | float:
    """A row entry's 95% CI in points: [low, high], or the half-width where it has no bounds."""
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)):
        return [100 * float(b) for b in ci]
    return 100 * float(entry["half_width"] if ci is None else ci)


def ablations(runs, out: Path, png: bool, min_records: int = ABLATION_MIN_RECORDS) -> dict:
    from attention_drift.views import plots

    result: dict = {"files": [], "n": {}, "not_drawn": {}}
    sweep = {n: w for n, w in WEIGHTS.items() if n in runs}
    numbers = md = None
    if len(sweep) >= 2:
        numbers, md = _table(_summaries(runs, list(sweep), shared=True, pairs=_against("rome", list(sweep))))
    if numbers is not None and not _too_small(numbers, "weight", result, min_records):
        rows = numbers["rows"]
        names = [n for n in rows if n != "pre-edit"]
        xs = [sweep[n] for n in names]
        groups = [g for g in ("efficacy", "paraphrase", "distract_neighborhood") if all(g in rows[n] for n in names)]
        series = {g.replace("_", " "): [100 * rows[n][g]["accuracy"] for n in names] for g in groups}
        ci = {g.replace("_", " "): [_ci_percent(rows[n][g]) for n in names] for g in groups}
        fig = plots.tradeoff_curve([_weight_label(n, w) for n, w in zip(names, xs)], series,
                                   "SADR weight γ (categories, not to scale)",
                                   "ROME + SADR: efficacy / paraphrase vs distract neighbourhood as γ grows · "
                                   f"{_records_text(numbers)} (shared records, 95% CIs)", ci=ci,
                                   ylabel="accuracy (%)")
        result["weight"] = {"weights": dict(zip(names, xs)), "numbers": numbers, "markdown": md}
        result["n"]["ablation_weight"] = _sizes(numbers)
        result["files"] += _save(fig, out, "ablation_weight", png)
    for family, names in ABLATION_FAMILIES.items():
        present = [n for n in names if n in runs]
        if not set(present) - {"rome", "rome-sadr"}:
            continue
        numbers, md = _table(_summaries(runs, present, shared=True, pairs=_against("rome", present)))
        if _too_small(numbers, family, result, min_records):
            continue
        bars = {label: {g: row[g] for g in SHOWN if g in row} for label, row in numbers["rows"].items()}
        fig = plots.metric_bars(bars, f"SADR ablation: {family} (95% CI) · {_records_text(numbers)} (shared)",
                                metrics=[g for g in SHOWN if any(g in row for row in bars.values())])
        result[family] = {"numbers": numbers, "markdown": md}
        result["n"][f"ablation_{family}"] = _sizes(numbers)
        result["files"] += _save(fig, out, f"ablation_{family}", png)
    if result["not_drawn"]:
        result["markdown"] = "Not drawn (fewer shared records than an ablation needs): " + "; ".join(
            f"{name} ({v['records']} records, needs {v['needed']})" for name, v in result["not_drawn"].items())
    return result
