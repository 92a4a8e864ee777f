"""Evaluate several editing variants side by side, one ``attention-drift evaluate`` process each.

The issue tables (ROME / MEMIT / PMET with and without SADR, SADR weight sweep, hinge vs
all-heads) are this script's output. Each variant writes a resumable run file
``OUT/<variant>.jsonl``; when ``--deadline`` passes, unfinished variants are stopped (what they
wrote stays valid, re-running continues) and every summary is printed.

    python benchmarks/eval_grid.py --data counterfact_dev.json --limit 100 --out runs/grid \\
        [--model smollm2-135m] [--device cuda] [--jobs 4] [--deadline 3600] [--variants rome,rome-sadr]

On the 2-core CPU machine one ROME edit takes ~50 s and ROME+SADR (80 steps) ~200 s, so the full
grid is a GPU job (or a long CPU one: use ``--jobs 1``).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "rome": ["--method", "rome"],
    "rome-sadr": ["--method", "rome", "--sadr"],
    "memit": ["--method", "memit"],
    "memit-sadr": ["--method", "memit", "--sadr"],
    "pmet": ["--method", "pmet"],
    "pmet-sadr": ["--method", "pmet", "--sadr"],
    # SADR sweep and ablations on ROME
    "rome-sadr-w0.1": ["--method", "rome", "--sadr", "--sadr-weight", "0.1"],
    "rome-sadr-w1": ["--method", "rome", "--sadr", "--sadr-weight", "1"],
    "rome-sadr-all": ["--method", "rome", "--sadr", "--sadr-selection", "all"],
    "rome-sadr-distract": ["--method", "rome", "--sadr", "--sadr-distract"],
    "rome-sadr-distract-w0.1": ["--method", "rome", "--sadr", "--sadr-distract", "--sadr-weight", "0.1"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="variants run at once")
    p.add_argument("--deadline", type=float, default=None, help="seconds before unfinished variants stop")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--fluency", action="store_true")
    p.add_argument("--stats-samples", type=int, default=300)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _prepare_statistics(args)
    print(f"statistics ready after {time.perf_counter() - start:.0f} s", flush=True)

    common = ["--model", args.model, "--data", args.data, "--limit", str(args.limit), "--balanced",
              "--device", args.device, "--stats-samples", str(args.stats_samples), "--no-progress"]
    if args.fluency:
        common.append("--fluency")
    waiting, running = list(names), {}
    while waiting or running:
        while waiting and len(running) < args.jobs:
            name = waiting.pop(0)
            cmd = [sys.executable, "-m", "attention_drift.cli", "evaluate", *common, *VARIANTS[name],
                   "--out", str(out / f"{name}.jsonl")]
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                print(f"{name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
                del running[name]
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            for name, (proc, log) in running.items():
                proc.terminate()
                proc.wait()
                log.close()
                print(f"{name}: stopped at the deadline", flush=True)
            running, waiting = {}, []
        time.sleep(2)

    from attention_drift.cli import markdown, summary
    from attention_drift.jsonl import read_run

    table = {}
    for name in names:
        path = out / f"{name}.jsonl"
        if path.exists():
            result = summary(read_run(path))
            table[name] = result
            print(f"\n## {name}\n\n{markdown(result)}", flush=True)
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return 0


def _prepare_statistics(args) -> None:
    """Compute the covariance statistics once, before the variants start (they share the cache)."""
    import dataclasses

    import torch

    from attention_drift.editing import MEMITConfig, PMETConfig, ROMEConfig
    from attention_drift.editing.stats import key_second_moments
    from attention_drift.models import load_model

    model = load_model(args.model, device=args.device)
    configs = [c.for_model(model) for c in (ROMEConfig, MEMITConfig, PMETConfig)]
    stats = dataclasses.replace(configs[0].stats, n_samples=args.stats_samples)
    layers = sorted({layer for c in configs for layer in c.layers})
    with torch.device(args.device):
        key_second_moments(model, layers, stats)


if __name__ == "__main__":
    sys.exit(main())
