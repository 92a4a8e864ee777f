"""Evaluate several editing variants side by side, each as one or more `attention-drift evaluate` processes.

The issue tables (ROME / MEMIT / PMET with and without SADR, SADR weight sweep, hinge vs
all-heads) are this script's output. Each variant writes a resumable run file
``OUT/<variant>.jsonl``; when ``--deadline`` passes, unfinished variants are stopped (what they
wrote stays valid, re-running continues) and every summary is printed.

    python benchmarks/eval_grid.py --data counterfact_dev.json --limit 100 --out runs/grid \\
        [--model smollm2-135m] [--device cuda] [--jobs 4] [--deadline 3600] [--shared-pre] \\
        [--variants rome:2,rome-sadr:4]

``NAME:K`` runs a variant as K processes over disjoint shards of the records (``evaluate
--shard``), merged into ``OUT/<NAME>.jsonl`` at the end (also after the deadline);
``--shared-pre`` scores the unedited model once and lets every variant reuse it
(``evaluate --reuse-pre``).

On the 2-core CPU machine with ``--jobs 2`` (one thread per process) a ROME edit took 44 s on
average, ROME+SADR (80 steps) 160 s, MEMIT / PMET 21 / 25 s, plus ~30 s of evaluation per record with
``--fluency``: the six main variants on 100 records are ~13 core-hours there (the last 175
records of the committed grid took 2 h), minutes on a GPU.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from attention_drift.variants import paper_variants

VARIANTS = paper_variants()



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--out", default="runs/grid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="processes run at once")
    p.add_argument("--deadline", type=float, default=None, help="seconds before unfinished processes stop")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated NAME or NAME:K (K processes, each a shard of the records)")
    p.add_argument("--shared-pre", action="store_true",
                   help="score the unedited model once (variant 'none', over --jobs shards) and let every "
                   "variant reuse those pre-edit scores")
    p.add_argument("--fluency", action="store_true")
    p.add_argument("--stats-samples", type=int, default=300)
    args = p.parse_args(argv)
    plan = {}
    for item in args.variants.split(","):
        name, _, k = item.partition(":")
        plan[name] = int(k or 1)
    unknown = [n for n in plan if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _prepare_statistics(args)
    print(f"statistics ready after {time.perf_counter() - start:.0f} s", flush=True)

    common = ["--model", args.model, "--data", args.data, "--limit", str(args.limit), "--balanced",
              "--device", args.device, "--no-progress"]
    if args.fluency:
        common.append("--fluency")
    deadline = None if args.deadline is None else start + args.deadline
    if args.shared_pre:
        _run_sharded(out, {"none": args.jobs}, common, args.jobs, deadline, start)
        common += ["--reuse-pre", str(out / "none.jsonl")]
    common += ["--stats-samples", str(args.stats_samples)]
    _run_sharded(out, plan, common, args.jobs, deadline, start)

    from attention_drift.report import markdown, summary
    from attention_drift.jsonl import read_run

    table = {}
    for name in plan:
        path = out / f"{name}.jsonl"
        if path.exists():
            result = summary(read_run(path))
            table[name] = result
            print(f"\n## {name}\n\n{markdown(result)}", flush=True)
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return 0


def _run_sharded(out: Path, plan: dict[str, int], common: list[str], jobs: int, deadline, start) -> None:
    """Run every variant of ``plan`` as K shard processes (at most ``jobs`` at once), then merge
    each variant's shards into ``out/<name>.jsonl`` (records already there are not redone)."""
    from attention_drift.jsonl import merge_runs, split_run

    queue = []
    for name, k in plan.items():
        main_file = out / f"{name}.jsonl"
        parts = [out / f"{name}.shard{i}of{k}.jsonl" for i in range(k)]
        leftovers = sorted(out.glob(f"{name}.shard*of*.jsonl"))
        if leftovers:  # an interrupted grid: fold its shards back in first
            merge_runs(main_file, [main_file, *leftovers])
            for f in leftovers:
                f.unlink()
        if main_file.exists():
            split_run(main_file, parts)
        queue += [(i, name, k, part) for i, part in enumerate(parts)]
    queue.sort(key=lambda t: t[0])  # first shards of every variant first
    running = {}
    while queue or running:
        while queue and len(running) < jobs:
            i, name, k, part = queue.pop(0)
            cmd = [sys.executable, "-m", "attention_drift.cli", "evaluate", *common, "--variant", name,
                   "--shard", f"{i}/{k}", "--out", str(part)]
            log = open(part.with_suffix(".log"), "w")
            running[part] = (name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        for part, (name, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                print(f"{part.name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
                del running[part]
        if deadline is not None and time.perf_counter() > deadline:
            for part, (name, proc, log) in running.items():
                proc.terminate()
                proc.wait()
                log.close()
                print(f"{part.name}: stopped at the deadline", flush=True)
            running, queue = {}, []
        time.sleep(1)
    for name, k in plan.items():
        main_file = out / f"{name}.jsonl"
        parts = sorted(out.glob(f"{name}.shard*of*.jsonl"))
        if parts:
            n = merge_runs(main_file, [main_file, *parts])
            for f in parts:
                f.unlink()
            print(f"{main_file}: {n} records", flush=True)


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
