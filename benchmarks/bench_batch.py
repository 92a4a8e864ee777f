"""Batch editing vs single edits: 10 MEMIT edits one at a time beside one MEMIT edit of the same
10 requests, on SmolLM2-135M, in one process.

    python benchmarks/bench_batch.py [--threads 1] [--records 10] [--rounds 2]

On the default offline model (CPU), over the first ``--records`` records of the dev split's report
half (``load_dev(half="report")``), with statistics and templates prepared beforehand (a
one-step warm-up edit runs first), ``--rounds`` times, the order alternating (single first in
even rounds, batch first in odd ones) so a change of the machine's load hits both:

* single: each request edited alone (``apply_edit``), scored, restored; the seconds are the
  edits' (scoring excluded), summed;
* batch: one ``apply_edit`` of all the requests (MEMIT's batched update: the requests' value
  optimisations run together, ``memit.VALUE_BATCH`` requests per batch, each with its own loss,
  steps and result (``optimize.optimize_values_many``), then the keys and the least-squares update
  of each layer once for all), then every request scored, restored.

Prints per round the seconds of each, the part spent in the value optimisations (the same
steps either way, one request's rows per forward or several requests' together) and the rest, then the totals and their ratio, and per request the
efficacy (new target more likely than the old one on the request's prompt) and p(new) (per
target token) after its single edit and after the batch edit, so a faster batch is not bought
with failing edits. Timings on a machine shared with other jobs vary; compare numbers from one run.
"""

import argparse
import os
import time

import torch


def efficacy(model, requests) -> list[tuple[bool, float]]:
    """(new target beats the old one, p(new)) of each request on its own prompt, as efficacy is scored."""
    from attention_drift.core.scores import score_pairs

    with torch.no_grad():
        s = score_pairs(model, [r.prompt for r in requests], [r.target_new for r in requests],
                        [r.target_true for r in requests])
    return [(bool(r > w), float(r.exp())) for r, w in zip(s.log_p_right, s.log_p_wrong)]


def timed_edit(model, requests, config) -> tuple[float, float, int, list[tuple[bool, float]]]:
    """(seconds of the edit, of its value optimisation, steps run, :func:`efficacy` inside it) of one
    MEMIT edit of ``requests``, restored after."""
    from attention_drift.editing import apply_edit

    start = time.perf_counter()
    result = apply_edit(model, requests, "memit", config, progress=False)
    seconds = time.perf_counter() - start
    try:
        return seconds, sum(t.seconds for t in result.traces), sum(t.steps_run for t in result.traces), \
            efficacy(model, requests)
    finally:
        result.restore()


def single(model, requests, config) -> tuple[float, float, int, list[tuple[bool, float]]]:
    """:func:`timed_edit` of each request alone, summed."""
    runs = [timed_edit(model, [r], config) for r in requests]
    return (sum(r[0] for r in runs), sum(r[1] for r in runs), sum(r[2] for r in runs),
            [e for r in runs for e in r[3]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import dataclasses

    from attention_drift.core.data import load_dev
    from attention_drift.core.models import load_model, mlp_out_weight
    from attention_drift.editing import MEMITConfig, apply_edit

    model = load_model("smollm2-135m")
    records = load_dev(half="report")[: args.records]
    requests = [r.rewrite for r in records]
    config = MEMITConfig.for_model(model)
    originals = {l: mlp_out_weight(model, l).detach().clone() for l in config.layers}
    n = len(requests)
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}; MEMIT layers {config.layers}, "
          f"{config.steps} steps; {n} dev-report records (case_ids {[r.case_id for r in records]})", flush=True)
    apply_edit(model, requests[0], "memit", dataclasses.replace(config, steps=1), progress=False).restore()

    ways = {f"{n} single MEMIT edits": lambda: single(model, requests, config),
            f"1 MEMIT edit of {n}": lambda: timed_edit(model, requests, config)}
    totals = dict.fromkeys(ways, 0.0)
    effs = {}
    print(f"{'round':>5s} {'':22s} {'seconds':>8s} {'s/request':>9s} {'value opt. s':>12s} {'rest s':>7s} "
          f"{'steps':>5s} {'efficacy':>8s}", flush=True)
    for round_ in range(args.rounds):
        for label in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            seconds, opt, steps, effs[label] = ways[label]()
            totals[label] += seconds
            print(f"{round_:5d} {label:22s} {seconds:8.2f} {seconds / n:9.2f} {opt:12.2f} {seconds - opt:7.2f} "
                  f"{steps:5d} {sum(ok for ok, _ in effs[label]):5d}/{n}", flush=True)
    restored = all(torch.equal(mlp_out_weight(model, l), w) for l, w in originals.items())
    (single_label, single_s), (batch_label, batch_s) = totals.items()
    print(f"total over {args.rounds} round(s): single {single_s:.2f} s, batch {batch_s:.2f} s; batch / single "
          f"{batch_s / single_s:.2f}x the time; load average {os.getloadavg()[0]:.1f}; weights restored bitwise: "
          f"{restored}")
    print(f"{'case_id':>8s} {'single: wins':>12s} {'p(new)':>7s} | {'batch: wins':>11s} {'p(new)':>7s}  request")
    for record, (ok1, p1), (ok2, p2) in zip(records, effs[single_label], effs[batch_label]):
        r = record.rewrite
        print(f"{record.case_id!s:>8s} {ok1!s:>12s} {p1:7.3f} | {ok2!s:>11s} {p2:7.3f}  "
              f"{r.prompt!r} -> {r.target_new!r} (was {r.target_true!r})")


if __name__ == "__main__":
    main()
