"""r-ROME's two formulations in the authors' repository, side by side on the same records.

``compute-v``: the ``enable_random_prefix_keys`` branch of ``rome/compute_v.py`` (our r-ROME until
2026-12-07): ROME's 21 templates, ``k*`` the flat mean over them, and ``k*`` mapped to
``v_init + delta`` with ``v_init`` the bare prompt's output. ``r-rome-module``: the authors'
``r_rome`` module, :mod:`attention_drift.editing.r_rome` today: MEMIT's 6 templates, ``k*`` the
mean of the groups' means, and ``k*`` mapped to its own output plus ``delta``. Both share the value
optimisation; the script runs the registry's r-ROME and, for the old form, swaps in an executor
of that form (same ``C^-1``). It prints each record's P(new) / P(true) on its own prompt, then
efficacy (P(new) > P(true)) and paraphrase.

    python benchmarks/r_rome_keys.py --half tune --records 40
    python benchmarks/r_rome_keys.py --half report --case-ids 1,5,63,69,76
"""

import argparse
import dataclasses

import torch

import attention_drift as ad
from attention_drift.core.data import balanced_subset
from attention_drift.core.hooks import act_name, mlp_weight_name
from attention_drift.core.models import mlp_out_weight
from attention_drift.editing import registry
from attention_drift.editing.config import ROME_TEMPLATES
from attention_drift.editing.optimize import Objective, optimize_values
from attention_drift.editing.rome import rank_one_update
from attention_drift.editing.templates import context_templates


def compute_v_execute(model, requests, config, prepared, apply, extra_losses=()):
    """r-ROME as the ``enable_random_prefix_keys`` branch of the authors' ``rome/compute_v.py``:
    ROME's templates, the flat key mean, mapped to the bare prompt's output plus delta."""
    layer = config.layer
    site, key_hook = act_name("mlp_raw", layer), act_name("mlp_post", layer)
    templates = [t for g in context_templates(model, ROME_TEMPLATES, config.template_seed) for t in g]
    traces = []
    for request in requests:
        sol = optimize_values(model, request, templates, sites=[site], layer=layer, objective=Objective.of(config),
                              loss_layer=config.v_loss_layer, extra_losses=extra_losses,
                              reference_names=[key_hook, site])
        keys, outs = sol.reference[key_hook].double(), sol.reference[site].double()
        key, current = keys.mean(0), outs.mean(0)
        u = prepared.inverse_cov @ key
        upd = rank_one_update(model, layer, key, u / u.norm(), outs[0] + sol.delta[site].double(), current)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
        traces.append(sol.trace)
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--half", choices=("tune", "report"), default="tune")
    parser.add_argument("--records", type=int, default=40, help="balanced records of the half")
    parser.add_argument("--case-ids", default="", help="comma-separated case ids instead of --records")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ad.load_model("smollm2-135m")
    records = ad.load_dev(half=args.half)
    ids = {int(x) for x in args.case_ids.split(",") if x}
    records = [r for r in records if r.case_id in ids] if ids else balanced_subset(records, args.records)
    original = registry.EDITORS["r-rome"]
    forms = {"compute-v": dataclasses.replace(original, execute=compute_v_execute), "r-rome-module": original}
    results = {name: [] for name in forms}
    try:
        for record in records:
            cells = [str(record.case_id)]
            for name, editor in forms.items():
                registry.EDITORS["r-rome"] = editor
                with ad.edit(model, record.rewrite, method="r-rome", progress=False):
                    scores = ad.evaluate_record(model, record, groups=["efficacy", "paraphrase"])
                eff, para = scores.groups["efficacy"], scores.groups.get("paraphrase")
                results[name].append((eff.correct[0], list(para.correct) if para else []))
                cells.append(f"{name} {eff.p_right[0]:.4f}/{eff.p_wrong[0]:.4f}")
            print(" | ".join(cells), flush=True)
    finally:
        registry.EDITORS["r-rome"] = original
    print(f"\n{args.half} half, {len(records)} records (P(new)/P(true) on the record's own prompt above)")
    for name, rows in results.items():
        es = 100 * sum(r[0] for r in rows) / len(rows)
        para = [c for r in rows for c in r[1]]
        ps = f"{100 * sum(para) / len(para):.1f} ({len(para)} prompts)" if para else "-"
        print(f"{name:14s} ES {es:5.1f}  PS {ps}")


if __name__ == "__main__":
    main()
