"""Tune SADR variants on the development split's *tuning* half, never on the report half.

Runs the candidate variants of :func:`attention_drift.variants.sadr_candidates` (and plain ROME /
the published SADR for reference) on the first ``--records`` CounterFact-type records of
``--data dev-tune`` (distract neighbourhood, paraphrase and neighbourhood come from those) into
resumable run files ``OUT/<variant>.jsonl``, pre-edit scores computed once (``OUT/none.jsonl``),
then prints one line per variant: efficacy, paraphrase, neighbourhood and distract neighbourhood
(pooled %), the fraction of plain ROME's distract-neighbourhood loss it recovers, and seconds
per edit.

    python benchmarks/tune_sadr.py [--records 16] [--variants rome,rome-plus-o1,...] [--threads 1]
"""

import argparse
import json
import os
import sys
from pathlib import Path

from attention_drift.variants import paper_variants

GROUPS = ("efficacy", "paraphrase", "neighborhood", "distract_neighborhood")


def pooled(run, phase: str, group: str) -> float | None:
    flags = [c for line in run.records if phase in line and group in line[phase]["groups"]
             for _, _, c in line[phase]["groups"][group]["scores"]]
    return 100 * sum(flags) / len(flags) if flags else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--kinds", default="counterfact")
    p.add_argument("--variants", default=None, help="comma-separated; default: rome, rome-sadr and every candidate")
    p.add_argument("--out", default="benchmarks/results/plus/tune")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="print the table of the run files already there")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from attention_drift.jsonl import read_run
    from attention_drift.runs import ModelHandle, RecordSelection, evaluate_run, run_meta
    from attention_drift.runtime import configure_threads

    table = paper_variants()
    names = args.variants.split(",") if args.variants else [n for n in table if n in ("rome", "rome-sadr")
                                                             or n.startswith("rome-plus")]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(table)}")
    selection = RecordSelection("dev-tune", kinds=tuple(args.kinds.split(",")), limit=args.records)
    records = selection.load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        configure_threads(args.threads)
        handle = ModelHandle("smollm2-135m")
        none = table["none"]
        evaluate_run(handle, records, none, out / "none.jsonl", run_meta(handle.name, none, selection, None),
                     progress=False)
        for name in names:
            variant = table[name]
            evaluate_run(handle, records, variant, out / f"{name}.jsonl",
                         run_meta(handle.name, variant, selection, None), reuse_pre=out / "none.jsonl",
                         progress=False)
            print(f"done {name}", file=sys.stderr, flush=True)

    ids = {json.dumps(r.case_id) for r in records}
    runs = {}
    for path in sorted(out.glob("*.jsonl")):
        run = read_run(path)
        run.records[:] = [line for line in run.records if json.dumps(line["case_id"]) in ids]
        runs[path.stem] = run
    base = runs.get("rome")
    dns_pre = pooled(base, "pre", "distract_neighborhood") if base else None
    dns_rome = pooled(base, "post", "distract_neighborhood") if base else None
    print(f"{'variant':28s} {'n':>3s} " + " ".join(f"{g[:8]:>8s}" for g in GROUPS) + "  recovered  s/edit")
    for name, run in runs.items():
        phase = "pre" if name == "none" else "post"
        values = [pooled(run, phase, g) for g in GROUPS]
        dns = values[-1]
        rec = ((dns - dns_rome) / (dns_pre - dns_rome) if None not in (dns, dns_rome, dns_pre)
               and dns_pre != dns_rome else None)
        secs = [line["edit_seconds"] for line in run.records if line.get("edit_seconds")]
        print(f"{name:28s} {len(run.records):3d} " + " ".join(f"{v:8.1f}" if v is not None else f"{'-':>8s}"
                                                             for v in values)
              + (f"  {100 * rec:8.0f}%" if rec is not None else f"  {'-':>9s}")
              + (f"  {sum(secs) / len(secs):6.1f}" if secs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
