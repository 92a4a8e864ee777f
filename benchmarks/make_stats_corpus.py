"""Sample, once, the covariance-statistics corpus of an offline model and ship it as package data.

    OMP_NUM_THREADS=1 python benchmarks/make_stats_corpus.py [--model smollm2-135m]

Runs the ``corpus="model"`` sampler (:func:`attention_drift.editing.corpus.sample_chunk`,
the code a first edit would otherwise run) for the preset statistics (``StatsConfig()``:
seed 0, 300 sequences of 128 tokens, i.e. 10 whole chunks of 32) on one thread, and writes
the ids with their identity (weights, tokenizer, sampler, seed, length) to
``attention_drift/corpora/<model>-seed<S>-len<L>.safetensors``. Statistics then read that
file instead of sampling (:func:`attention_drift.editing.corpus.shipped_corpus`). With
``--check N`` it also re-samples the first N chunks and confirms the file holds the same ids.
"""

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-samples", type=int, default=None, help="default: StatsConfig().n_samples")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: the package's corpora folder")
    parser.add_argument("--check", type=int, default=0, help="re-sample this many chunks and compare")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)

    import dataclasses

    from attention_drift.editing import StatsConfig
    from attention_drift.editing.corpus import SAMPLE_CHUNK, SHIPPED_DIR, sample_chunk, shipped_corpus, write_corpus_file
    from attention_drift.core.models import load_model

    stats = StatsConfig()
    stats = dataclasses.replace(stats, **{k: v for k, v in (("n_samples", args.n_samples), ("seed", args.seed),
                                                            ("seq_len", args.seq_len)) if v is not None})
    model = load_model(args.model)
    out = args.out or SHIPPED_DIR / f"{args.model}-seed{stats.seed}-len{stats.seq_len}.safetensors"
    n_chunks = -(-stats.n_samples // SAMPLE_CHUNK)
    if not out.exists():
        rows: list[list[int]] = []
        start = time.perf_counter()
        for chunk in range(n_chunks):
            rows.extend(sample_chunk(model, stats, chunk))
            print(f"chunk {chunk + 1}/{n_chunks}: {time.perf_counter() - start:.0f} s", flush=True)
        seconds = time.perf_counter() - start
        write_corpus_file(model, stats, rows, out)
        print(f"wrote {out} ({out.stat().st_size} bytes): {len(rows)} x {stats.seq_len} tokens "
              f"in {seconds:.0f} s ({len(rows) * stats.seq_len / seconds:.0f} tokens/s, 1 thread)")
    shipped = shipped_corpus(model, stats, out.parent)
    if shipped is None or len(shipped) < stats.n_samples:
        raise SystemExit(f"{out} is not recognised as the corpus of {args.model} for {stats}")
    for chunk in range(args.check):
        again = sample_chunk(model, stats, chunk)
        same = again == shipped[chunk * SAMPLE_CHUNK:(chunk + 1) * SAMPLE_CHUNK]
        print(f"chunk {chunk} re-sampled: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
