"""Records per minute of ``attention-drift sweep`` with 1, 2, ... workers on this machine.

    python benchmarks/bench_sweep.py [--model tiny|smollm2-135m|PATH] [--variants none,rome] [--records 8]
                                     [--workers 1,2] [--device cuda] [--gpus-per-worker 0.0625]

For each worker count the same sweep runs into a new folder (1 worker: in this process, no Ray;
more: on a fresh local Ray with ``--workers`` CPUs); the covariance statistics are computed once
beforehand (in a temporary cache) so every count finds them on disk, as a real sweep's workers do. Printed per count: records per minute
over the whole sweep (worker start, model loading, every record; Ray's own start excluded) and
in steady state (first to last line written). ``--model tiny``: the 2-layer random Llama of
the tests (its editor presets: 5 optimisation steps), which measures the engine's overhead more
than editing; on a GPU machine run e.g. ``--model smollm2-135m --device cuda --workers 16``.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (the tests' random Llama) or a model name / path")
    p.add_argument("--variants", default="none,rome", help="comma-separated variants (default: %(default)s)")
    p.add_argument("--records", type=int, default=8, help="records of the packaged example (default: 8)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ATTENTION_DRIFT_CACHE", tempfile.mkdtemp(prefix="bench_sweep_cache_"))
    import contextlib

    import torch

    torch.set_num_threads(1)
    from attention_drift.runs.evaluation import RecordSelection
    from attention_drift.runs.executor import ray_session
    from attention_drift.runs.placement import Placement
    from attention_drift.runs.sweep import SweepConfig, run_sweep
    from attention_drift.runs.variants import paper_variants

    table = paper_variants()
    variants = tuple(table[name] for name in args.variants.split(","))
    model = _model_name(args.model)
    _prepare_statistics(model, variants, args.device)
    selection = RecordSelection(limit=args.records)
    print(f"model {args.model} ({model}), variants {args.variants}, {args.records} records, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| workers | records/min (whole sweep) | records/min (steady) | seconds |\n|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
        out = Path(tempfile.mkdtemp(prefix=f"bench_sweep_{workers}w_"))
        times: list[float] = []
        config = SweepConfig(variants, out, selection, progress=False)
        placement = Placement(model, device=args.device, gpus_per_worker=args.gpus_per_worker, threads=1,
                              workers=workers)
        with contextlib.nullcontext() if placement.in_process else ray_session(placement):
            start = time.perf_counter()
            outcome = run_sweep(config, placement, on_line=lambda name, line: times.append(time.perf_counter()))
            seconds = time.perf_counter() - start
        records = sum(outcome.written.values()) / len(variants)
        steady = "-"
        if len(times) > len(variants):
            span = times[-1] - times[0]
            steady = f"{(len(times) - 1) / len(variants) / span * 60:.1f}"
        print(f"| {workers} | {records / seconds * 60:.1f} | {steady} | {seconds:.1f} |", flush=True)
    return 0


def _model_name(name: str) -> str:
    if name != "tiny":
        return name
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


def _prepare_statistics(model_name: str, variants, device: str) -> None:
    """Fill the statistics cache once, so no timed sweep computes it."""
    from attention_drift.editing.stats import key_second_moments
    from attention_drift.runs.evaluation import ModelHandle
    from attention_drift.runs.placement import Placement

    editing = [v for v in variants if v.edits]
    if not editing:
        return
    model = ModelHandle(Placement(model_name, device=device)).get()
    for variant in editing:
        config, _ = variant.resolve(model)
        key_second_moments(model, config.layers, config.stats, progress=False)


if __name__ == "__main__":
    sys.exit(main())
