"""Evaluate several editing variants side by side: ``attention-drift sweep`` plus a summary per variant.

The issue tables (ROME / MEMIT / PMET with and without SADR, SADR weight sweep, hinge vs
all-heads) are this script's output. The work is one sweep (:mod:`attention_drift.runs.sweep`:
records x variants in this process or as Ray tasks, statistics computed once, pre-edit scores shared) into the
resumable run files ``OUT/<variant>.jsonl``; when ``--deadline`` passes the sweep is stopped
(what it wrote stays valid, re-running continues) and every summary is printed, also into
``OUT/summary.json``.

    python benchmarks/eval_grid.py --data counterfact_dev.json --limit 100 --out runs/grid \\
        [--model smollm2-135m] [--device cuda] [--workers 16] [--deadline 3600] \\
        [--variants none,rome,rome-sadr]

Older commands still run: ``--jobs`` is ``--workers``, ``NAME:K`` is ``NAME`` (Ray spreads the
records of every variant over all workers) and ``--shared-pre`` is always on.

On the 2-core CPU machine with 2 workers (one thread each) a ROME edit took 44 s on average,
ROME+SADR (80 steps) 160 s, MEMIT / PMET 21 / 25 s, plus ~30 s of evaluation per record with
``--fluency``: the six main variants on 100 records are ~13 core-hours there, minutes on a GPU.
"""

import argparse
import json
import sys
from pathlib import Path

from attention_drift.runs.variants import paper_variants, with_stats_samples

VARIANTS = paper_variants()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=100, help="records, half of each kind (default: 100)")
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", "--jobs", type=int, default=1,
                   help="workers (1: in this process; N > 1: Ray actors) (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--address", default=None, help="a Ray cluster to join instead of a local Ray")
    p.add_argument("--deadline", type=float, default=None, help="seconds before the sweep stops")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    p.add_argument("--shared-pre", action="store_true", help="(always on; kept for older commands)")
    p.add_argument("--fluency", action="store_true")
    p.add_argument("--stats-samples", type=int, default=300)
    args = p.parse_args(argv)
    names = [item.partition(":")[0] for item in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    from attention_drift.measure.evaluate import FluencyConfig
    from attention_drift.core.jsonl import read_run
    from attention_drift.reports.evaluation import markdown, summary
    from attention_drift.runs.evaluation import RecordSelection
    from attention_drift.runs.placement import Placement
    from attention_drift.runs.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        tuple(with_stats_samples(VARIANTS[n], args.stats_samples) for n in names), Path(args.out),
        RecordSelection(args.data, limit=args.limit, balanced=True), fluency=FluencyConfig() if args.fluency else None,
        deadline=args.deadline)
    placement = Placement(args.model, device=args.device, gpus_per_worker=args.gpus_per_worker, threads=1,
                          workers=args.workers, address=args.address)
    outcome = run_sweep(config, placement)
    state = "done" if outcome.complete else "stopped at the deadline (re-run to continue)"
    print(f"sweep {state} after {outcome.seconds:.0f} s: {outcome.written} written, {outcome.retried} retried",
          flush=True)

    table = {}
    for variant in config.variants:
        path = config.path(variant)
        if path.exists():
            table[variant.name] = summary(read_run(path))
            print(f"\n## {variant.name}\n\n{markdown(table[variant.name])}", flush=True)
    if table:
        (Path(args.out) / "summary.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
