"""Sequential editing's two cost goals, from a sequence run: the per-edit cost stays flat along the
sequence, and monitoring adds little to the run.

    python benchmarks/bench_sequence.py --from benchmarks/results/sequence/rome      # a finished run
    python benchmarks/bench_sequence.py --method rome --edits 200 --every 20 --out DIR [--threads 1]

Prints, from ``DIR/sequence.json`` (a run made here first when ``--out`` is given): seconds per
edit over the first block of ``every`` edits and over the last one, and their ratio (goal: within
1.2x), and the time spent monitoring over the time spent editing (goal: <= 25% with a checkpoint
every 20 edits; the unedited baseline of the probes is counted as monitoring). Timings on a
machine shared with other jobs vary; compare numbers from one run.
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
    print(f"  editing {timing['edit_seconds']:.0f} s, monitoring {timing['monitor_seconds']:.0f} s: monitoring adds "
          f"{100 * timing['monitor_seconds'] / timing['edit_seconds']:.0f}% (goal <= 25%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", default=None, help="a finished sequence folder to read")
    parser.add_argument("--out", default=None, help="run a sequence into this folder first (resumes)")
    parser.add_argument("--method", default="rome")
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if (args.source is None) == (args.out is None):
        parser.error("give --from DIR (a finished run) or --out DIR (run one)")
    if args.out:
        subprocess.run([sys.executable, "-m", "attention_drift.cli", "sequence", "--method", args.method, "--data", "dev",
                        "--edits", str(args.edits), "--every", str(args.every), "--probes", str(args.probes),
                        "--threads", str(args.threads), "--no-progress", "--out", args.out], check=True)
    report(Path(args.source or args.out))


if __name__ == "__main__":
    main()
