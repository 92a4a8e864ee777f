"""Seconds per edit and per optimisation step of ROME and ROME+SADR on SmolLM2-135M, beside the
paper's official code on the same machine, and where the time of a step goes.

    python benchmarks/bench_editing.py [--threads 2] [--records 3] [--all-methods] [--step-costs] [--runs ROME,ROME+cross]
    python benchmarks/bench_editing.py --pair memit,alphaedit [--rounds 2]   # two editors side by side

Prints, on the default offline model (CPU), over the first ``--records`` example records
(CounterFact-type first, as the reference runs), with statistics and templates prepared
beforehand (as for every edit after the first; a warm-up edit runs first):

* ROME (20 steps) and ROME+SADR (weight 0.01, 80 steps): seconds per edit and per step, the
  official code's figures and the ratios (official / ours: > 1 means we are faster); then the
  published SADR with distract rows (``distract=True``, the batch holds three more, longer rows)
  and SADR+ (``--sadr-variant plus``) and ``--sadr-variant cross`` (SADR+ with key nulls), with the
  distract-row / published ratio and each SADR+ variant's edit / ROME's edit;
* with ``--all-methods``, every other registered editor too (``attention_drift.editing.EDITORS``,
  each with its preset for the model); with ``--stats``, the throughput of sampling
  the statistics corpus and of accumulating ``k k^T``;
* with ``--step-costs``: one value-optimisation step (forward + backward) done four ways on the
  same ROME batch: (a) as the official code: full forward and full-vocabulary logits at every
  position; (b) all blocks re-run but logits only at the target positions; (c) blocks from the
  edit layer on, on the cached residual, logits only at the target positions; (d) ours: as (c)
  but only the positions from the subject's last token (earlier keys / values cached) to the
  last one a loss reads (not a row's last target token, nor the essence row after its subject).

``--pair A,B`` instead times only editors A and B (their presets), side by side: for each record
and round one edit of each, the order alternating, each restored before the next, and prints both
seconds per edit and the ratio B / A (per record pair, then of the means), e.g. AlphaEdit against
MEMIT, whose value optimisation it shares (the goal: <= 1.2x).

Timings on a machine shared with other jobs vary; compare numbers from one run.
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

# The paper's official code (EasyEdit fork, transformers 4.40.1, float32, eager attention,
# 2 threads) on the same 2-core machine, SmolLM2-135M-Instruct, ROME at layer 5, first three
# CounterFact-type held-out records, statistics excluded. From the project's measurement notes
# (shared/notes/official_baseline.md, "Side by side with attention_drift"); not shipped.
OFFICIAL = {
    "ROME": {"s_per_edit": 22.19, "s_per_step": 1.044, "steps": 20},
    "ROME+SADR": {"s_per_edit": 86.13, "s_per_step": 1.060, "steps": 80},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="the official figures used 2")
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--all-methods", action="store_true", help="also every other registered editor")
    parser.add_argument("--stats", action="store_true", help="also the statistics throughput")
    parser.add_argument("--step-costs", action="store_true", help="also the per-step comparison")
    parser.add_argument("--step-repeats", type=int, default=4)
    parser.add_argument("--runs", default=None,
                        help="comma-separated labels of the rows to time, e.g. ROME,ROME+SADR+,ROME+cross (default: all)")
    parser.add_argument("--pair", default=None, help="A,B: time only these two editors, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --pair")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.pair:
        return pair(args)

    from attention_drift.core.data import load_example
    from attention_drift.editing import EDITORS, ROMEConfig, apply_edit
    from attention_drift.core.models import load_model
    from attention_drift.editing.sadr import SADRConfig
    from attention_drift.runs.variants import sadr_variant

    model = load_model("smollm2-135m")
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    records = sorted(load_example(), key=lambda r: r.kind != "counterfact")[: args.records]
    rome = ROMEConfig.for_model(model)
    runs = [("ROME", "rome", rome, None), ("ROME+SADR", "rome", rome, SADRConfig(weight=0.01, steps=80)),
            ("+distract", "rome", rome, SADRConfig(weight=0.01, steps=80, distract=True)),
            ("ROME+SADR+", "rome", rome, sadr_variant("plus", "rome").resolve(model, "rome", rome.layer)),
            ("ROME+cross", "rome", rome, sadr_variant("cross", "rome").resolve(model, "rome", rome.layer))]
    if args.runs:
        wanted = args.runs.split(",")
        unknown = [w for w in wanted if w not in [r[0] for r in runs]]
        if unknown or "ROME" not in wanted:
            raise SystemExit(f"--runs takes ROME and any of {', '.join(r[0] for r in runs)}; got {args.runs!r}")
        runs = [r for r in runs if r[0] in wanted]
    if args.all_methods:
        runs += [(name.upper(), name, editor.config_type.for_model(model), None)
                 for name, editor in EDITORS.items() if name != "rome"]
    if args.stats:
        stats_throughput(model, dataclasses.replace(rome.stats, n_samples=32))
    print(f"{'':10s} {'ours s/edit':>11s} {'s/step':>7s} {'steps':>5s} | {'official s/edit':>15s} {'s/step':>7s} "
          f"| {'ratio/edit':>10s} {'ratio/step':>10s}")
    seconds = {}
    for label, method, cfg, sadr in runs:
        warm_sadr = dataclasses.replace(sadr, steps=1) if sadr is not None else None
        apply_edit(model, records[0].rewrite, method, dataclasses.replace(cfg, steps=1), sadr=warm_sadr,
                   progress=False).restore()
        per_edit, per_step, steps = [], [], []
        for record in records:
            start = time.perf_counter()
            result = apply_edit(model, record.rewrite, method, cfg, sadr=sadr, progress=False)
            result.restore()
            per_edit.append(time.perf_counter() - start)
            steps.append(result.traces[0].steps_run)
            per_step.append(result.traces[0].seconds / steps[-1])
        edit_s, step_s = statistics.mean(per_edit), statistics.mean(per_step)
        line = f"{label:10s} {edit_s:11.2f} {step_s:7.3f} {statistics.mean(steps):5.1f}"
        if label in OFFICIAL:
            ref = OFFICIAL[label]
            line += (f" | {ref['s_per_edit']:15.2f} {ref['s_per_step']:7.3f} | {ref['s_per_edit'] / edit_s:9.2f}x "
                     f"{ref['s_per_step'] / step_s:9.2f}x")
        print(line, flush=True)
        seconds[label] = edit_s
    if "+distract" in seconds and "ROME+SADR" in seconds:
        print(f"distract-row SADR edit / published SADR edit (same weight and steps): "
              f"{seconds['+distract'] / seconds['ROME+SADR']:.2f}x")
    for label in ("ROME+SADR+", "ROME+cross"):
        if label in seconds:
            print(f"{label} edit / ROME edit: {seconds[label] / seconds['ROME']:.2f}x")
    if args.step_costs:
        step_costs(model, records[0].rewrite, rome, args.step_repeats)


def pair(args) -> None:
    """Editors A and B of ``--pair``, one edit each per record and round, alternating."""
    from attention_drift.core.data import load_example
    from attention_drift.core.models import load_model
    from attention_drift.editing import EDITORS, apply_edit

    names = args.pair.split(",")
    if len(names) != 2 or any(n not in EDITORS for n in names):
        raise SystemExit(f"--pair takes two editors of {', '.join(EDITORS)}, got {args.pair!r}")
    model = load_model("smollm2-135m")
    records = sorted(load_example(), key=lambda r: r.kind != "counterfact")[: args.records]
    configs = {n: EDITORS[n].config_type.for_model(model) for n in names}
    for n in names:  # warm-up: statistics, templates and (AlphaEdit) the projection, made or loaded once
        apply_edit(model, records[0].rewrite, n, dataclasses.replace(configs[n], steps=1), progress=False).restore()
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}; {names[1]} / {names[0]}, "
          f"{len(records)} records x {args.rounds} rounds, order alternating", flush=True)
    times = {n: [] for n in names}
    for round_ in range(args.rounds):
        for i, record in enumerate(records):
            order = names if (round_ + i) % 2 == 0 else names[::-1]
            for n in order:
                start = time.perf_counter()
                apply_edit(model, record.rewrite, n, configs[n], progress=False).restore()
                times[n].append(time.perf_counter() - start)
            a, b = times[names[0]][-1], times[names[1]][-1]
            print(f"round {round_} record {record.case_id}: {names[0]} {a:6.2f} s, {names[1]} {b:6.2f} s, "
                  f"ratio {b / a:.2f}", flush=True)
    a, b = statistics.mean(times[names[0]]), statistics.mean(times[names[1]])
    print(f"mean s/edit: {names[0]} {a:.2f}, {names[1]} {b:.2f}; {names[1]} / {names[0]} {b / a:.2f}x; "
          f"median of the per-record ratios "
          f"{statistics.median(y / x for x, y in zip(times[names[0]], times[names[1]])):.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")


def stats_throughput(model, stats) -> None:
    """Tokens per second of sampling one corpus chunk and of the key statistics at layer 5."""
    from attention_drift.editing.corpus import SAMPLE_CHUNK, sample_chunk
    from attention_drift.editing.stats import key_second_moments

    start = time.perf_counter()
    sample_chunk(model, stats, 0)
    sample_s = time.perf_counter() - start
    old = os.environ.get("ATTENTION_DRIFT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATTENTION_DRIFT_CACHE"] = tmp
        try:
            from attention_drift.editing.corpus import corpus_sequences

            n_tokens = sum(len(s) for s in corpus_sequences(model, stats, progress=False))
            start = time.perf_counter()
            key_second_moments(model, [5], stats, progress=False)
            acc_s = time.perf_counter() - start
        finally:
            if old is None:
                os.environ.pop("ATTENTION_DRIFT_CACHE", None)
            else:
                os.environ["ATTENTION_DRIFT_CACHE"] = old
    print(f"stats: sampling {SAMPLE_CHUNK * stats.seq_len / sample_s:.0f} tok/s; key statistics at layer 5 "
          f"{n_tokens / acc_s:.0f} tok/s ({n_tokens} tokens)")


def step_costs(model, request, cfg, repeats: int) -> None:
    """Time one forward+backward of the value optimisation, four ways."""
    from attention_drift.core.runner import LayerRunner, unembed_rows
    from attention_drift.editing.optimize import read_ends, rewriting_batch
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
    ends = read_ends(batch, n_rw, subj)

    def inject(act, hook):
        act = act.clone()
        act[rows, subj] = act[rows, subj] + delta
        return act

    def plain():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        lp = logits.log_softmax(-1)
        return -lp[ti, tp, tid].mean() + lp[n_rw:, :].sum() * 0

    def run_from(start, changes_from=None, ends=None):
        runner = LayerRunner(model, batch, start, changes_from=changes_from, ends=ends)
        target_at, subject_at = runner.index(ti, tp), runner.index(rows, subj)

        def hook(act, hook):
            act = act.clone()
            act[subject_at] = act[subject_at] + delta
            return act

        def step():
            with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_out", hook)]):
                final, _ = runner.run()
            return -unembed_rows(model, final[target_at]).log_softmax(-1)[torch.arange(len(tid)), tid].mean()
        return step

    def plain_step():
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_out", inject)]):
            return plain()

    ways = {"(a) full forward, full logits": plain_step, "(b) all blocks, target logits": run_from(0),
            f"(c) blocks {layer}.., target logits": run_from(layer),
            f"(d) blocks {layer}.., positions read (packed), target logits": run_from(layer, subj, ends)}
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
