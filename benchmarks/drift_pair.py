"""Two drift runs of the same records side by side: does the attention still drift where a mitigation
removed the failure?

Reads the ``drift.json`` of two ``attention-drift drift`` folders (e.g. ROME and ROME + SADR+ on the
same records). It prints three things:

- per group, the share of distract prompts that fail (the paper's definition, ``fails``) and the
  mean over prompts of the largest head drift onto the edited subject's last token (``max_drift_subject_last``);
- the first run's top heads with their mean drift in both runs;
- on the prompts the first run fails and the second does not, the mean ``max_drift_subject_last``
  under each run: if it stays, the mitigation keeps the attention and changes what it reads.

    python benchmarks/drift_pair.py benchmarks/results/plus-drift/rome benchmarks/results/plus-drift/rome-sadr-plus [--records 72]
"""

import argparse
import json
import statistics
from pathlib import Path

FACTOR = "max_drift_subject_last"


def load_pair(first: Path, second: Path, records: int | None) -> list[dict]:
    """Both runs' drift.json content; with ``records``, rebuilt from the first ``records`` records
    the two run files share (in the first's order), so a run still going gives fixed numbers."""
    if records is None:
        return [json.loads((d / "drift.json").read_text()) for d in (first, second)]
    from attention_drift.core.jsonl import read_run
    from attention_drift.reports.drift import drift_from_lines
    from attention_drift.views.explorer import RUN_FILE

    lines = [read_run(d / RUN_FILE).records for d in (first, second)]
    held = {json.dumps(x["case_id"]) for x in lines[1]}
    keep = [k for k in (json.dumps(x["case_id"]) for x in lines[0]) if k in held][:records]
    if len(keep) < records:
        raise SystemExit(f"the runs share {len(keep)} records, fewer than --records {records}")
    kept = set(keep)
    return [drift_from_lines([x for x in run if json.dumps(x["case_id"]) in kept]) for run in lines]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--records", type=int, default=None,
                   help="only the first N records both runs hold, rebuilt from their drift_records.jsonl (runs in progress)")
    args = p.parse_args(argv)
    runs = load_pair(Path(args.first), Path(args.second), args.records)
    names = [Path(d).name for d in (args.first, args.second)]
    samples = [{(json.dumps(s["case_id"]), s["prompt"]): s for s in run["samples"]} for run in runs]
    shared = sorted(set(samples[0]) & set(samples[1]))
    print(f"{len(shared)} distract prompts in both runs ({runs[0]['records']} and {runs[1]['records']} records)")
    groups = sorted({samples[0][k]["group"] for k in shared})
    print(f"\nA = {names[0]}, B = {names[1]}; fails: share of prompts failing; drift: mean {FACTOR}")
    print(f"{'group':24s}" + "".join(f"{'fails ' + ab:>12s}{'drift ' + ab:>12s}" for ab in "AB"))
    for group in groups + ["all"]:
        keys = [k for k in shared if group == "all" or samples[0][k]["group"] == group]
        row = f"{group:24s}"
        for s in samples:
            row += f"{100 * statistics.mean(s[k]['fails'] for k in keys):11.1f}%"
            row += f"{statistics.mean(s[k]['factors'][FACTOR] for k in keys):12.3f}"
        print(row + f"   ({len(keys)} prompts)")

    means = [run["head_stats"]["delta_subject_last"]["mean"] for run in runs]
    print(f"\n{names[0]}'s top {args.top_k} heads, mean drift onto the subject's last token:")
    print(f"{'head':10s}" + "".join(f"{n:>20s}" for n in names))
    for h in runs[0]["top_heads"][:args.top_k]:
        layer, head = h["layer"], h["head"]
        print(f"L{layer}H{head:<7d}" + "".join(f"{m[layer][head]:20.3f}" for m in means))

    fixed = [k for k in shared if samples[0][k]["fails"] and not samples[1][k]["fails"]]
    print(f"\nprompts {names[0]} fails and {names[1]} does not: {len(fixed)}")
    if fixed:
        for name, s in zip(names, samples):
            print(f"  mean {FACTOR} under {name}: {statistics.mean(s[k]['factors'][FACTOR] for k in fixed):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
