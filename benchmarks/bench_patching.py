"""Time a full layers x heads attention-pattern restoration sweep for one record.

Three ways to the same numbers, on SmolLM2-135M (30 layers x 9 query heads = 270 variants) by
default:

* batched: :func:`run_patched`, ``--batch-size`` variants per forward pass;
* one variant per forward pass: a full hooked forward pass per variant (:func:`run_variant`),
  scored from its logits: the plain way, and the baseline of the speed-up;
* unbatched: :func:`run_patched` with batch size 1 (its other shortcuts, no batching): how much
  of the speed-up batching itself brings.

The edit is a hand-made rank-one change of layer ``--edit-layer``'s W_out. ``run_patched`` skips
what a variant cannot change (variants restoring layers below the edit are the edited run; each
other variant runs from its own layer), so its time depends on that layer, not on which editor
made the change. All three must agree to 1e-4 in log-prob. Times are wall-clock and CPU (on a
shared machine the CPU times are the steadier ones).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_patching.py [--model smollm2-135m]
"""

import argparse
from pathlib import Path
import sys
import os
import time

import torch

from attention_drift.core import tokens
from attention_drift.core.data import load_example
from attention_drift.core.models import load_model
from attention_drift.measure.patching import PatchCase, layer_head_grid, record_activations, run_patched, run_variant


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from handmade_edit import push_subject as rank_one_edit  # noqa: E402  (the tests' hand-made edit)

BATCHED, PLAIN, UNBATCHED = "batched", "one variant per forward", "unbatched run_patched"


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
    runs = {
        BATCHED: lambda: run_patched(model, source, grid, batch_size=args.batch_size),
        PLAIN: lambda: torch.cat([source.score(run_variant(model, source, v)[0]).lp_true for v in grid.variants]),
        UNBATCHED: lambda: run_patched(model, source, grid, batch_size=1).patched.lp_true,
    }
    wall, cpu, lp_true = {}, {}, {}
    with rank_one_edit(model, record.rewrite, args.edit_layer, scale=30.0):
        run_patched(model, source, grid.variants[-2:], batch_size=2)  # warm-up (and the pattern probe)
        run_variant(model, source, grid.variants[-1])
        for label, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            lp_true[label] = run()
            wall[label], cpu[label] = time.perf_counter() - start, time.process_time() - start_cpu
    result = lp_true[BATCHED]
    lp_true[BATCHED] = result.patched.lp_true
    for label in runs:
        print(f"{label:>26}: {wall[label]:7.2f} s  ({1000 * wall[label] / len(grid.variants):6.1f} ms per variant; "
              f"CPU {cpu[label]:7.2f} s)")
    print(f"speed-up of batched (batch size {args.batch_size}) over one variant per forward pass: "
          f"{wall[PLAIN] / wall[BATCHED]:.1f}x ({cpu[PLAIN] / cpu[BATCHED]:.1f}x in CPU time); over unbatched "
          f"run_patched: {wall[UNBATCHED] / wall[BATCHED]:.1f}x ({cpu[UNBATCHED] / cpu[BATCHED]:.1f}x)")
    diff = max((lp_true[label] - lp_true[PLAIN]).abs().max().item() for label in (BATCHED, UNBATCHED))
    print(f"max |lp_true - lp_true of one variant per forward pass| = {diff:.2e}")
    values = result.values("delta_logodds")
    layer, head = divmod(int(values.flatten().argmax()), values.shape[1])
    print(f"P(true): clean {result.source.p_true.item():.4f}, edited {result.base.p_true.item():.4f}; "
          f"largest log-odds gain {values.max().item():+.4f} at layer {layer} head {head}")
    if diff > 1e-4:
        raise SystemExit(f"the sweeps disagree by {diff:.2e}")


if __name__ == "__main__":
    main()
