"""Time a full layers x heads attention-pattern restoration sweep for one record.

Batched (``--batch-size`` variants share a forward pass) against one variant per forward pass,
on SmolLM2-135M (30 layers x 9 query heads = 270 variants) by default. The edit is a hand-made
rank-one change of layer 5's W_out (the benchmark times patching, not editing; the sweep's cost
does not depend on which edit made the weights). Both runs must agree to 1e-4 in log-prob.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patching.py [--model smollm2-135m]
"""

import argparse
from pathlib import Path
import sys
import os
import time

import torch

from attention_drift import tokens
from attention_drift.data import load_example
from attention_drift.models import load_model
from attention_drift.patching import PatchCase, layer_head_grid, record_activations, run_patched


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from handmade_edit import push_subject as rank_one_edit  # noqa: E402  (the tests' hand-made edit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=64, help="variants per forward pass when batched")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids oversubscription on a shared machine)")
    parser.add_argument("--edit-layer", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    record = load_example()[0]
    case = PatchCase.distract(record.rewrite, record.neighborhood.prompts[0], record.neighborhood.targets[0])
    grid = layer_head_grid(model, "pattern")
    n_tokens = len(tokens.encode(model, case.prompt))
    print(f"model {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads = "
          f"{len(grid.variants)} variants; prompt {n_tokens} tokens; {torch.get_num_threads()} threads")

    source = record_activations(model, case, grid.variants)
    timings, results = {}, {}
    with rank_one_edit(model, record.rewrite, args.edit_layer, scale=30.0):
        run_patched(model, source, grid.variants[:2], batch_size=2)  # warm-up (and the pattern probe)
        for label, size in (("batched", args.batch_size), ("one variant per forward", 1)):
            start = time.perf_counter()
            results[label] = run_patched(model, source, grid, batch_size=size)
            timings[label] = time.perf_counter() - start
    batched, single = results["batched"], results["one variant per forward"]
    diff = (batched.patched.lp_true - single.patched.lp_true).abs().max().item()
    for label, seconds in timings.items():
        print(f"{label:>26}: {seconds:7.2f} s  ({1000 * seconds / len(grid.variants):6.1f} ms per variant)")
    print(f"speed-up {timings['one variant per forward'] / timings['batched']:.1f}x with batch size "
          f"{args.batch_size}; max |lp_true batched - single| = {diff:.2e}")
    values = batched.values("delta_logodds")
    layer, head = divmod(int(values.flatten().argmax()), values.shape[1])
    print(f"P(true): clean {batched.source.p_true.item():.4f}, edited {batched.base.p_true.item():.4f}; "
          f"largest log-odds gain {values.max().item():+.4f} at layer {layer} head {head}")
    if diff > 1e-4:
        raise SystemExit(f"batched and per-variant sweeps disagree by {diff:.2e}")


if __name__ == "__main__":
    main()
