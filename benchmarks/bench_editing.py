"""Seconds per edit for ROME, MEMIT and PMET on SmolLM2-135M, and where the time goes.

    python benchmarks/bench_editing.py [--threads 2] [--records 3] [--stats-samples 1000]

Prints, on the default offline model (CPU):
* covariance statistics throughput: tokens/s of sampling the corpus from the model and of
  accumulating ``k k^T`` (measured on a fresh, small corpus in a temporary cache);
* seconds per edit (statistics and templates already prepared, as for every edit after the
  first) and per optimisation step, per method, over the first ``--records`` example records;
* the cost of one value-optimisation step (forward + backward) done three ways on the same
  ROME batch: (a) as the official code: full forward and full-vocabulary logits at every
  position; (b) all blocks re-run but logits only at the target positions; (c) blocks from the
  edit layer on, on the cached residual, logits only at the target positions; (d) ours: as (c)
  but only the positions from the subject's last token on (earlier keys / values cached).

Timings on a machine shared with other jobs vary; compare numbers from one run.
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--stats-samples", type=int, default=None, help="override the preset's sample count")
    parser.add_argument("--step-repeats", type=int, default=4)
    parser.add_argument("--steps-only", action="store_true", help="only the per-step comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from attention_drift.data import load_example
    from attention_drift.editing import MEMITConfig, PMETConfig, ROMEConfig, StatsConfig, apply_edit
    from attention_drift.models import load_model

    model = load_model("smollm2-135m")
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    records = load_example()[: args.records]
    configs = [ROMEConfig.for_model(model), MEMITConfig.for_model(model), PMETConfig.for_model(model)]
    if args.stats_samples:
        configs = [dataclasses.replace(c, stats=StatsConfig(n_samples=args.stats_samples)) for c in configs]
    if args.steps_only:
        step_costs(model, records[0].rewrite, configs[0], args.step_repeats)
        return
    stats_throughput(model, StatsConfig(n_samples=32, seq_len=128))
    for cfg in configs:
        apply_edit(model, records[0].rewrite, cfg.method, dataclasses.replace(cfg, steps=1)).restore()  # warm-up
        per_edit, per_step = [], []
        for record in records:
            start = time.perf_counter()
            result = apply_edit(model, record.rewrite, cfg.method, cfg, progress=False)
            result.restore()
            per_edit.append(time.perf_counter() - start)
            steps = result.traces[0].steps_run
            per_step.append(result.traces[0].seconds / steps)
        print(f"{cfg.method.upper():5s} {statistics.mean(per_edit):6.2f} s/edit "
              f"({statistics.mean(per_step):.3f} s/step, {steps} steps in the last edit, layers {cfg.layers})")
    step_costs(model, records[0].rewrite, configs[0], args.step_repeats)


def stats_throughput(model, stats) -> None:
    from attention_drift.editing.stats import corpus_sequences, key_second_moments, stats_path

    old = os.environ.get("ATTENTION_DRIFT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATTENTION_DRIFT_CACHE"] = tmp
        try:
            start = time.perf_counter()
            sequences = corpus_sequences(model, stats, progress=False)
            sample_s = time.perf_counter() - start
            n_tokens = sum(len(s) for s in sequences)
            start = time.perf_counter()
            key_second_moments(model, [5], stats, progress=False)
            acc_s = time.perf_counter() - start
            import json

            prov = json.loads(stats_path(model, 5, stats).with_suffix(".json").read_text())
        finally:
            if old is None:
                os.environ.pop("ATTENTION_DRIFT_CACHE", None)
            else:
                os.environ["ATTENTION_DRIFT_CACHE"] = old
    print(f"stats: sampling {n_tokens / sample_s:.0f} tok/s; accumulating k k^T at layer 5 "
          f"{prov['tokens'] / acc_s:.0f} tok/s ({n_tokens} tokens)")


def step_costs(model, request, cfg, repeats: int) -> None:
    """Time one forward+backward of the value optimisation, three ways."""
    from attention_drift.editing.optimize import LayerRunner, rewriting_batch, unembed_rows
    from attention_drift.editing.templates import context_templates

    flat = [t for g in context_templates(model, cfg.context_templates, cfg.template_seed) for t in g]
    batch, n_rw, subj = rewriting_batch(model, request, flat)
    rows = torch.arange(len(batch))
    layer = cfg.layer
    delta = torch.zeros(int(model.cfg.d_model), requires_grad=True)
    targets = [(i, p) for i in range(n_rw) for p in range(int(batch.prompt_lengths[i]) - 1,
                                                        int(batch.lengths[i]) - 1)]
    ti, tp = torch.tensor([t[0] for t in targets]), torch.tensor([t[1] for t in targets])
    tid = batch.input_ids[ti, tp + 1]

    def inject(act, hook):
        act = act.clone()
        act[rows, subj] = act[rows, subj] + delta
        return act

    def plain():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        lp = logits.log_softmax(-1)
        return -lp[ti, tp, tid].mean() + lp[n_rw:, :].sum() * 0

    def run_from(start, changes_from=None):
        runner = LayerRunner(model, batch, start, changes_from=changes_from)
        local_tp, local_subj = runner.local(ti, tp), runner.local(rows, subj)

        def hook(act, hook):
            act = act.clone()
            act[rows, local_subj] = act[rows, local_subj] + delta
            return act

        def step():
            with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_out", hook)]):
                final, _ = runner.run()
            return -unembed_rows(model, final[ti, local_tp]).log_softmax(-1)[torch.arange(len(tid)), tid].mean()
        return step

    def plain_step():
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_out", inject)]):
            return plain()

    ways = {"(a) full forward, full logits": plain_step, "(b) all blocks, target logits": run_from(0),
            f"(c) blocks {layer}.., target logits": run_from(layer),
            f"(d) blocks {layer}.., positions from the subject on, target logits": run_from(layer, subj)}
    times = {name: float("inf") for name in ways}
    for fn in ways.values():
        fn().backward()  # warm-up
    for _ in range(repeats):  # interleaved, best of: robust to other jobs on the machine
        for name, fn in ways.items():
            start = time.perf_counter()
            fn().backward()
            times[name] = min(times[name], time.perf_counter() - start)
    base = times["(a) full forward, full logits"]
    for name, seconds in times.items():
        print(f"step {name}: {seconds:.3f} s (x{base / seconds:.2f} vs (a); best of {repeats})")


if __name__ == "__main__":
    main()
