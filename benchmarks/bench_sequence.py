"""Sequential editing's two cost goals, from a sequence run: the per-edit cost stays flat along the
sequence, and monitoring adds little to the run.

    python benchmarks/bench_sequence.py --from benchmarks/results/sequence/rome      # a finished run
    python benchmarks/bench_sequence.py --method rome --edits 200 --every 20 --out DIR [--threads 1]
    python benchmarks/bench_sequence.py --side-by-side benchmarks/results/sequence/rome --method rome \
        [--sadr-variant plus] [--block 20] [--rounds 2]

Prints, from ``DIR/sequence.json`` (a run made here first when ``--out`` is given): seconds per
edit over the first block of ``every`` edits and over the last one, and their ratio (goal: within
1.2x), and the time spent monitoring over the time spent editing (goal: <= 25% with a checkpoint
every 20 edits; the unedited baseline of the probes is counted as monitoring). Timings on a
machine shared with other jobs vary; compare numbers from one run.

The run's own blocks are timed minutes or hours apart, so a change of the machine's load between
them moves their ratio. ``--side-by-side DIR`` times the two ends in one process instead, in
alternating order: ``--block`` edits of the sequence's first records on the unedited model (edits
1-20), then as many edits of the next records after the run's last checkpoint, on the model that
holds its N edits (edits N+1..N+20; the flags must be the run's, so the records and checkpoint
match), each block's weights restored after it. It prints the seconds per edit of each block and
round, the value optimisation's steps per edit (what an edited model could change), and the ratio.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def report(folder: Path) -> None:
    summary = json.loads((folder / "sequence.json").read_text())
    timing, meta = summary["timing"], summary["meta"]
    first, last = timing["first_block_seconds_per_edit"], timing["last_block_seconds_per_edit"]
    every = meta["monitor"]["every"]
    n = summary["edits"][-1]
    print(f"{folder}: {meta['variant']} on {meta['model']}, {n} edits, a checkpoint every {every} "
          f"({len(meta['probes'])} probes, drift on {meta['monitor']['drift_records']} edited records each)")
    print(f"  seconds per edit, edits 1-{every}: {first:.2f}   edits {n - every + 1}-{n}: {last:.2f}   "
          f"ratio last / first: {last / first:.2f} (goal <= 1.2)")
    from attention_drift.reports.sequence import monitor_overhead

    blocks = sum(1 for s in timing["seconds_per_edit"])
    print(f"  editing {timing['edit_seconds']:.0f} s ({blocks} of {len(summary['edits']) - 1} blocks timed), monitoring "
          f"{timing['monitor_seconds']:.0f} s in all, {timing.get('timed_monitor_seconds', timing['monitor_seconds']):.0f} s "
          f"at the unedited checkpoint and the timed blocks: monitoring adds {100 * monitor_overhead(summary):.0f}% "
          f"(goal <= 25%)")


def side_by_side(folder: Path, args) -> None:
    """Edits 1..block on the unedited model against edits N+1..N+block after the run's checkpoint."""
    import os
    import time

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from attention_drift.core.data import load_dev
    from attention_drift.core.models import load_model
    from attention_drift.editing import apply_edit
    from attention_drift.measure.monitor import MonitorConfig
    from attention_drift.runs.sequence import SequenceConfig, at_checkpoint, split_records
    from attention_drift.runs.variants import Variant, sadr_variant

    sadr = sadr_variant(args.sadr_variant, args.method) if args.sadr_variant else None
    name = args.method + (f"-sadr-{args.sadr_variant}" if sadr else "")
    config = SequenceConfig(Variant(name, args.method, sadr), args.edits, monitor=MonitorConfig(every=args.every))
    model = load_model("smollm2-135m")
    edits, probes = split_records(load_dev(), args.probes)
    editor_config, sadr_config = config.variant.resolve(model)

    def block(records, state) -> tuple[float, float]:
        seconds, steps, results = 0.0, 0, []
        try:
            for record in records:
                start = time.perf_counter()
                results.append(apply_edit(model, record.rewrite, args.method, editor_config, sadr=sadr_config,
                                          progress=False, state=state))
                seconds += time.perf_counter() - start
                steps += sum(t.steps_run for t in results[-1].traces)
                state = results[-1].state
        finally:
            for result in reversed(results):  # each undo puts back the weights from before its edit, bitwise
                result.restore()
        return seconds / len(records), steps / len(records)

    def start_block() -> tuple[int, tuple[float, float]]:
        return 0, block(edits[: args.block], None)

    def end_block() -> tuple[int, tuple[float, float]]:
        with at_checkpoint(model, edits, probes, folder, config) as (done, state):
            return done, block(edits[done: done + args.block], state)

    apply_edit(model, edits[0].rewrite, args.method, editor_config, sadr=sadr_config, progress=False).restore()  # warm-up
    totals = {"first": [], "after": []}
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}; {name}, blocks of {args.block} edits",
          flush=True)
    for round_ in range(args.rounds):
        order = [("first", start_block), ("after", end_block)]
        for label, fn in (order if round_ % 2 == 0 else order[::-1]):
            done, (per_edit, steps) = fn()
            totals[label].append(per_edit)
            if label == "after":
                checkpoint = done
            where = f"edits {done + 1}-{done + args.block} " + ("(unedited model)" if done == 0 else f"(after {done})")
            print(f"round {round_}  {where:34s} {per_edit:7.2f} s/edit  {steps:5.1f} steps/edit", flush=True)
    first, after = sum(totals["first"]) / args.rounds, sum(totals["after"]) / args.rounds
    print(f"mean s/edit: first {first:.2f}, after {checkpoint} edits {after:.2f}; ratio {after / first:.2f} "
          f"(goal <= 1.2); load average {os.getloadavg()[0]:.1f}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", default=None, help="a finished sequence folder to read")
    parser.add_argument("--out", default=None, help="run a sequence into this folder first (resumes)")
    parser.add_argument("--method", default="rome")
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side-by-side", default=None, help="a sequence folder to time both ends of (see above)")
    parser.add_argument("--sadr-variant", default=None, help="the run's SADR variant (e.g. plus), if any")
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.side_by_side:
        side_by_side(Path(args.side_by_side), args)
        return
    if (args.source is None) == (args.out is None):
        parser.error("give --from DIR (a finished run) or --out DIR (run one)")
    if args.out:
        subprocess.run([sys.executable, "-m", "attention_drift.cli", "sequence", "--method", args.method, "--data", "dev",
                        "--edits", str(args.edits), "--every", str(args.every), "--probes", str(args.probes),
                        "--threads", str(args.threads), "--no-progress", "--out", args.out], check=True)
    report(Path(args.source or args.out))


if __name__ == "__main__":
    main()
