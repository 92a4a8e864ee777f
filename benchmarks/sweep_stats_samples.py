"""How edit quality depends on the number of covariance samples (and a quick efficacy check).

    python benchmarks/sweep_stats_samples.py [--method rome] [--samples 100 300 1000]
        [--data PATH --records 10]

For each sample count N: the method's preset with ``StatsConfig(n_samples=N)`` (sequences of
128 tokens sampled from the model), one edit per record, restored after scoring; pooled
efficacy (ES), paraphrase (PS), neighbourhood (NS) and relation (RS) accuracy, as in
``sweep_edit_layer.py``. Statistics are computed on first use and cached (the smaller
corpora are prefixes of the larger ones).
"""

import argparse
import dataclasses
import os
import time

import torch

from editing_eval import pooled, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="rome", choices=["rome", "memit", "pmet"])
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--data", default=None, help="CounterFact json (default: the shipped example records)")
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from attention_drift.core.data import balanced_subset, load_counterfact, load_example
    from attention_drift.editing import CONFIG_TYPES, StatsConfig, edit
    from attention_drift.editing.stats import key_second_moments
    from attention_drift.core.models import load_model

    model = load_model(args.model)
    records = load_example() if args.data is None else load_counterfact(args.data)
    records = balanced_subset(records, args.records)
    preset = CONFIG_TYPES[args.method].for_model(model)
    layers = (preset.layer,) if args.method == "rome" else preset.layers
    print(f"{args.method.upper()} layers {layers}, {len(records)} records")
    print(f"{'N':>5} {'ES':>6} {'PS':>6} {'NS':>6} {'RS':>6} {'stats s':>8} {'s/edit':>7}")
    row("none", pooled([score(model, r) for r in records]), 0.0, 0.0)
    for n in args.samples:
        cfg = dataclasses.replace(preset, stats=StatsConfig(n_samples=n))
        start = time.perf_counter()
        key_second_moments(model, layers, cfg.stats)
        stats_s = time.perf_counter() - start
        scores, start = [], time.perf_counter()
        for record in records:
            with edit(model, record.rewrite, args.method, cfg):
                scores.append(score(model, record))
        row(str(n), pooled(scores), stats_s, (time.perf_counter() - start) / len(records))


def row(name: str, result: dict, stats_s: float, seconds: float) -> None:
    print(f"{name:>5} {result['efficacy']:6.1f} {result['paraphrase']:6.1f} {result['neighborhood']:6.1f} "
          f"{result['relation']:6.1f} {stats_s:8.1f} {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
