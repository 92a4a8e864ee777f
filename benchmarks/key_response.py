"""How strongly a ROME edit fires at the edited subject in each context: the key side of the edit.

A ROME update adds ``(v* - W k) u^T / (u . k_bare)`` to the edited MLP, so wherever the subject's
last token has key ``k`` the MLP output moves by the optimised delta times ``r(k) = u . k / u . k_bare``
(1 on the bare request prompt). A key holds only the tokens up to the subject, so ``r`` is the same
for a paraphrase and for the edit sentence restated after it, but may differ for a mention
("... about {subject}.") whose words before the subject differ. For the first ``--records``
CounterFact-type records of ``dev-tune`` this prints the median ``r`` per context under ROME's ``u``
and under ``u`` with :data:`~attention_drift.editing.sadr.NULL_MENTIONS` nulled
(:func:`~attention_drift.editing.rome.update_direction`, every rewriting key kept, as
``SADRConfig.key_nulls`` edits): the rewriting templates, the record's paraphrase prompts, the
nulled mentions themselves, the distract suite's mention sentence (never nulled) and five other
mention sentences never nulled, and the RMS response over the layer's whole key distribution
(``sqrt(u^T C u) / |u . k_bare|``: what every other token gets).

    python benchmarks/key_response.py --records 24
"""

import argparse
import os
import statistics

HELD_OUT = ("She wrote a book on {subject}.", "Have you ever seen {subject}?",
            "Photos of {subject} were shared online.", "The documentary covers {subject}.",
            "Nobody expected {subject}")
"""Mentions of the subject that no variant reads: other words and grammar than NULL_MENTIONS."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from attention_drift.core.hooks import act_name
    from attention_drift.core.models import load_model
    from attention_drift.editing import rome
    from attention_drift.editing.config import ROMEConfig
    from attention_drift.editing.optimize import subject_activations, template_rows
    from attention_drift.editing.sadr import NULL_MENTIONS
    from attention_drift.measure.groups import MENTION
    from attention_drift.runs.evaluation import RecordSelection

    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m")
    config = ROMEConfig.for_model(model)
    prepared = rome.prepare(model, config, progress=False)
    inverse = prepared.inverse_cov
    cov = torch.linalg.inv(inverse)
    hook = act_name("mlp_post", config.layer)
    records = RecordSelection("dev-tune", kinds=("counterfact",), limit=args.records).load()
    contexts = ("templates", "paraphrases", "nulled mentions", "suite mention", "held-out mentions", "every token (RMS)")
    response = {u: {c: [] for c in contexts} for u in ("ROME", "key_nulls")}
    for record in records:
        rw = record.rewrite
        prompts, positions = template_rows(model, rw, prepared.templates)
        keys = subject_activations(model, prompts, positions, [hook])[hook].double()
        nulled = rome.subject_keys(model, [m.format(subject=rw.subject) for m in NULL_MENTIONS], rw.subject, hook)
        by_context = {
            "templates": keys[1:],
            "paraphrases": rome.subject_keys(model, list(record.paraphrase.prompts), rw.subject, hook),
            "nulled mentions": nulled,
            "suite mention": rome.subject_keys(model, [MENTION.format(subject=rw.subject)], rw.subject, hook),
            "held-out mentions": rome.subject_keys(model, [m.format(subject=rw.subject) for m in HELD_OUT], rw.subject, hook),
        }
        for name, direction in (("ROME", rome.update_direction(inverse, keys)),
                                ("key_nulls", rome.update_direction(inverse, keys, nulled))):
            bare = float(direction @ keys[0])
            for context, k in by_context.items():
                response[name][context] += (k @ direction / bare).tolist()
            response[name]["every token (RMS)"].append(float(direction @ cov @ direction) ** 0.5 / abs(bare))
    print(f"median response r(k) = u.k / u.k_bare of a ROME edit at the subject's last token, layer {config.layer}, "
          f"first {len(records)} CounterFact-type dev-tune records (SmolLM2-135M)")
    print(f"{'context':20s}" + "".join(f"{name:>12s}" for name in response))
    for context in contexts:
        print(f"{context:20s}" + "".join(f"{statistics.median(response[name][context]):12.2f}" for name in response))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
