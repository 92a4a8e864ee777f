"""Where does SADR+'s protection act? Patching between a SADR+ edit and a plain ROME edit of one fact.

SADR+ changes only the value ROME writes (its output term acts during the value optimisation), so
the two edits differ in one rank-one update of the same MLP. For each distract-neighbourhood prompt
(the paper's DNS form) of the first ``--records`` CounterFact-type records of ``dev-report`` this
makes both edits, caches the SADR+-edited run and runs the ROME-edited model with parts of it
patched in (:func:`attention_drift.measure.patching.patch_states`). Each part's share of the gap is
``sum(patched - ROME) / sum(SADR+ - ROME)`` of the log-odds true-vs-new target, over the prompts
where SADR+ moves that log-odds by at least ``--min-gap`` nats. A record-clustered bootstrap gives
the 95% interval. The reverse, ROME's parts patched into the SADR+ run, says how much of the
failure each brings back. If the paper's causal story carries the protection, the attention
patterns (where heads look) close most of the gap; if what the subject's residual carries does,
the subject residual closes it with the patterns left as ROME's.

    python benchmarks/plus_mechanism.py --records 30 --out benchmarks/results/plus-drift/mechanism.json
"""

import argparse
import json
import os
import time
from pathlib import Path


def part_variants(model, edit_layer: int, top_heads) -> dict:
    """The parts patched, by name: what each one carries from one state into the other."""
    from attention_drift.measure.patch_record import topk_variant
    from attention_drift.measure.patching import Patch

    every = tuple(range(model.cfg.n_layers))
    above = tuple(range(edit_layer + 1, model.cfg.n_layers))
    return {
        "edited MLP output, every position (check: all of it)": (Patch("mlp_out", edit_layer),),
        "subject's last-token residual, every layer": (Patch("resid_post", every, positions="subject_last"),),
        "attention patterns, every layer and head": (Patch("pattern", every),),
        "attention patterns, layers above the edit": (Patch("pattern", above),),
        f"attention patterns of ROME's top {len(top_heads)} drifting heads": topk_variant(top_heads),
        "head outputs (z) at the last token, every layer": (Patch("z", every, positions=(-1,)),),
        "MLP outputs at the last token, every layer": (Patch("mlp_out", every, positions=(-1,)),),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=30)
    p.add_argument("--data", default="dev-report")
    p.add_argument("--min-gap", type=float, default=1.0, help="nats of log-odds SADR+ must move a prompt by")
    p.add_argument("--heads-from", default="figures/drift/drift.json",
                   help="a drift.json whose top heads are patched as a set (default: ROME's drift run of the figures)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/plus-drift/mechanism.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from attention_drift.core.models import load_model
    from attention_drift.editing import edit
    from attention_drift.measure.patching import PatchCase, patch_states
    from attention_drift.reports.stats import bootstrap_ratio
    from attention_drift.runs.analysis import load_top_heads
    from attention_drift.runs.evaluation import RecordSelection
    from attention_drift.runs.variants import paper_variants

    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    rome_config, _ = paper_variants()["rome"].resolve(model)
    plus_config, plus_sadr = paper_variants()["rome-sadr-plus"].resolve(model)
    top = load_top_heads(args.heads_from, args.top_k)
    parts = part_variants(model, rome_config.layers[-1], top)
    variants = [()] + list(parts.values())
    records = [r for r in RecordSelection(args.data, kinds=("counterfact",)).load() if r.neighborhood.prompts]
    records = records[:args.records]

    out = Path(args.out)
    done = {}
    if out.with_suffix(".jsonl").exists():
        for line in out.with_suffix(".jsonl").read_text().splitlines():
            row = json.loads(line)
            done[json.dumps(row["case_id"])] = row
    with out.with_suffix(".jsonl").open("a") as sink:
        for i, record in enumerate(records):
            if json.dumps(record.case_id) in done:
                continue
            start = time.perf_counter()
            with edit(model, record.rewrite, method="rome", config=rome_config, progress=False) as rome:
                pass
            with edit(model, record.rewrite, method="rome", config=plus_config, sadr=plus_sadr, progress=False) as plus:
                pass
            cases = PatchCase.from_record(record, ("neighborhood",))
            forward = patch_states(model, cases, lambda: plus, lambda: rome, variants)
            backward = patch_states(model, cases, lambda: rome, lambda: plus, variants)
            row = {"case_id": record.case_id, "fallback": plus.fallback,
                   "rome_logodds": [r.base.logodds.item() for r in forward],
                   "plus_logodds": [r.source.logodds.item() for r in forward],
                   "plus_into_rome": [r.patched.logodds.tolist()[1:] for r in forward],
                   "rome_into_plus": [r.patched.logodds.tolist()[1:] for r in backward],
                   "seconds": time.perf_counter() - start}
            print(json.dumps(row), file=sink, flush=True)
            done[json.dumps(record.case_id)] = row
            print(f"record {i + 1}/{len(records)} ({row['seconds']:.0f} s)", flush=True)

    rows = [done[json.dumps(r.case_id)] for r in records if json.dumps(r.case_id) in done]
    names = list(parts)
    table = {"records": len(rows), "min_gap": args.min_gap, "top_heads": top, "parts": {}}
    for direction, key in (("SADR+ into ROME", "plus_into_rome"), ("ROME into SADR+", "rome_into_plus")):
        num, den, clusters = {n: [] for n in names}, [], []
        for c, row in enumerate(rows):
            for j, (lo_rome, lo_plus) in enumerate(zip(row["rome_logodds"], row["plus_logodds"])):
                if abs(lo_plus - lo_rome) < args.min_gap:
                    continue
                base, source = (lo_rome, lo_plus) if key == "plus_into_rome" else (lo_plus, lo_rome)
                den.append(source - base)
                clusters.append(c)
                for n, patched in zip(names, row[key][j]):
                    num[n].append(patched - base)
        table["parts"][direction] = {}
        print(f"\n{direction}: share of the log-odds gap closed ({len(den)} prompts of {len(rows)} records moved "
              f">= {args.min_gap} nats; record-clustered bootstrap 95% CI)")
        for n in names:
            est = bootstrap_ratio(np.array(num[n]), np.array(den), np.array(clusters))
            table["parts"][direction][n] = {"share": est.value, "ci95": [est.ci_low, est.ci_high], "prompts": len(den)}
            print(f"  {n:58s} {100 * est.value:6.1f}%  [{100 * est.ci_low:6.1f}, {100 * est.ci_high:6.1f}]")
    out.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
