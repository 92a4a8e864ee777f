"""Tune SADR variants on the development split's *tuning* half, never on the report half.

Runs the candidate variants of :func:`attention_drift.runs.variants.sadr_candidates` (and plain ROME /
the published SADR for reference) on the first ``--records`` CounterFact-type records of
``--data dev-tune`` (distract neighbourhood, paraphrase and neighbourhood come from those) into
resumable run files ``OUT/<variant>.jsonl``, pre-edit scores computed once (``OUT/none.jsonl``),
then prints one line per variant: efficacy, paraphrase, neighbourhood and distract neighbourhood
(pooled %), against plain ROME on shared records (paired) the fraction of its distract-neighbourhood
loss recovered with a record-clustered bootstrap CI and the paraphrase difference, and seconds per
edit. ``--figure``: the trade-off plot of all of them and of the report half's runs.

    python benchmarks/tune_sadr.py [--records 16] [--variants rome,rome-plus-o1,...] [--threads 1]
"""

import argparse
import json
import os
import sys
from pathlib import Path

from attention_drift.runs.variants import paper_variants

GROUPS = ("efficacy", "paraphrase", "neighborhood", "distract_neighborhood")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--kinds", default="counterfact")
    p.add_argument("--variants", default=None, help="comma-separated; default: rome, rome-sadr and every candidate")
    p.add_argument("--out", default="benchmarks/results/plus/tune")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--groups", default=None,
                   help="comma-separated groups scored besides the default ones, e.g. mention_neighborhood: the "
                   "suite's contexts in view while designing (the others stay unscored, held out)")
    p.add_argument("--report-only", action="store_true", help="print the table of the run files already there")
    p.add_argument("--figure", default=None, help="also write the trade-off figure (e.g. figures/sadr_tradeoff.html)")
    p.add_argument("--report", default="benchmarks/results/grid-today,benchmarks/results/plus,benchmarks/results/editors",
                   help="folders of the report half's run files (for --figure), comma-separated; a run name is "
                   "taken from the first folder that has it")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from attention_drift.core.jsonl import read_run
    from attention_drift.runs.evaluation import RecordSelection, evaluate_run, run_meta
    from attention_drift.runs.executor import Executor
    from attention_drift.runs.placement import Placement

    variants = paper_variants()
    names = args.variants.split(",") if args.variants else [n for n in variants if n in ("rome", "rome-sadr")
                                                             or n.startswith("rome-plus")]
    unknown = [n for n in names if n not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(variants)}")
    from attention_drift.measure.evaluate import BASE_GROUPS

    extra = tuple(args.groups.split(",")) if args.groups else ()
    groups = BASE_GROUPS + tuple(g for g in extra if g not in BASE_GROUPS) if extra else None
    selection = RecordSelection("dev-tune", kinds=tuple(args.kinds.split(",")), limit=args.records)
    records = selection.load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        handle = Executor(Placement("smollm2-135m", threads=args.threads)).worker.handle  # threads set
        none = variants["none"]
        evaluate_run(handle, records, none, out / "none.jsonl",
                     run_meta(handle.name, none, selection, None, groups=groups), progress=False, groups=groups)
        for name in names:
            variant = variants[name]
            evaluate_run(handle, records, variant, out / f"{name}.jsonl",
                         run_meta(handle.name, variant, selection, None, groups=groups), reuse_pre=out / "none.jsonl",
                         progress=False, groups=groups)
            print(f"done {name}", file=sys.stderr, flush=True)

    ids = {json.dumps(r.case_id) for r in records}
    runs = {}
    for path in sorted(out.glob("*.jsonl")):
        run = read_run(path)
        run.records[:] = [line for line in run.records if json.dumps(line["case_id"]) in ids]
        runs[path.stem] = run
    print(table(runs, GROUPS + extra))
    if args.figure:
        figure(runs, [Path(f) for f in args.report.split(",") if f], Path(args.figure))
    return 0


def _recovered(point) -> str:
    if point is None:
        return ""
    ci = point["recovered_ci95"]
    return f"{100 * point['recovered']:4.0f}% " + (f"[{100 * ci[0]:4.0f},{100 * ci[1]:4.0f}]" if ci else "")


def table(runs, groups=GROUPS) -> str:
    """Pooled accuracies of ``groups`` per run, and against plain ROME on shared records (paired): the
    share of its loss recovered [95% CI] in each distract group shown, and the paraphrase difference."""
    from attention_drift.reports.evaluation import summary, tradeoff

    lost = [g for g in groups if g not in ("efficacy", "paraphrase", "neighborhood")]
    points = {g: {p["variant"]: p for p in tradeoff(runs, "rome", group=g)} if "rome" in runs else {} for g in lost}
    lines = [f"{'variant':26s} {'n':>3s} " + " ".join(f"{g[:8]:>8s}" for g in groups)
             + "".join(f"  {'recovered ' + g[:8]:19s}" for g in lost) + "  PS diff  s/edit"]
    for name, run in runs.items():
        phase = "pre" if name == "none" else "post"
        result = summary(run)
        values = [(result["groups"].get(g, {}).get(phase) or {}).get("accuracy") for g in groups]
        cells = " ".join(f"{100 * v:8.1f}" if v is not None else f"{'-':>8s}" for v in values)
        recs = "".join(f"  {_recovered(points[g].get(name)):19s}" for g in lost)
        p = points[lost[0]].get(name) if lost else None
        para = "" if p is None else f"{100 * p['cost_diff']:+6.1f}"
        secs = result["meta"]["seconds_per_edit"]
        lines.append(f"{name:26s} {len(run.records):3d} {cells}{recs} {para:>7s}"
                     + (f"  {secs:6.1f}" if secs is not None else ""))
    return "\n".join(lines)


def figure(tuning, report_dirs: list[Path], path: Path) -> None:
    """The trade-off of every variant tried (tuning half) and of the report half's runs."""
    from attention_drift.views import plots
    from attention_drift.core.jsonl import read_run
    from attention_drift.reports.evaluation import tradeoff

    points = {"tuning half (ROME)": tradeoff(tuning, "rome")}
    grid = {p.stem: read_run(p) for p in sorted(Path("benchmarks/results/grid").glob("rome*.jsonl"))}
    if "rome" in grid:  # the earlier SADR sweep (first 100 dev records, older statistics)
        points["earlier SADR sweep (dev, ROME)"] = tradeoff(grid, "rome")
    from attention_drift.runs.variants import editor_names

    files: dict[str, Path] = {}
    for folder in report_dirs:
        for f in sorted(folder.glob("*.jsonl")):
            files.setdefault(f.stem, f)
    for base in editor_names():
        if base in files:
            plain = read_run(files[base])
            done = {n: read_run(files[n]) for n in (f"{base}-sadr", f"{base}-sadr-plus") if n in files}
            done = {n: r for n, r in done.items() if len(r.records) >= len(plain.records)}  # partial runs wait
            if done:
                points[f"report half ({base})"] = tradeoff({base: plain, **done}, base)
    shown = {k: v for k, v in points.items() if v}
    fig = plots.recovery_tradeoff(shown, "SADR variants: distract-neighbourhood loss recovered vs paraphrase cost "
                                  "(95% CIs; each number's variant and records in the legend)")
    entries = sum(len(v) for v in shown.values()) + 2 * len(shown)  # legend rows: points and group titles
    fig.update_layout(width=1300, height=max(800, 120 + 24 * entries))
    plots.save(fig, path.with_suffix(".html"), plotlyjs="directory")
    plots.save(fig, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
