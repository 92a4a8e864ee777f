"""Which heads read the edited subject, before any edit: per head, the attention from a prompt's
last token to the subject's last token (the unedited model), averaged over records, for three kinds
of prompt: the request's own prompt, its paraphrases (CounterFact's, most behind an unrelated
sentence), and the "mention" distract rows of SADR's candidates (a sentence naming the subject,
then the prompt about another subject, :func:`attention_drift.editing.sadr.distract_prompts`).

A check before regularising heads by what they do on the rewriting rows: if the heads that drift
onto the subject in other prompts after an edit are the very heads that read it in its own prompts
and paraphrases, exempting the readers exempts the drifting heads. Reads only the tuning half.

    python benchmarks/subject_readers.py --records 20 > benchmarks/results/cross/readers.txt
"""

import argparse

import torch

from attention_drift.core import data
from attention_drift.core.models import load_model
from attention_drift.editing.optimize import subject_last_index
from attention_drift.editing.sadr import distract_prompts
from attention_drift.measure.drift import collect_attention_rows, ranked_heads

DRIFT_HEADS = ((21, 6), (23, 4), (23, 5), (22, 6), (23, 1))
"""ROME's largest mean drifts on the gallery's drift records (``figures/drift/drift.json``)."""


def subject_attention(model, rows: list[tuple[str, int]], subject: str) -> torch.Tensor:
    """``[prompt, layer, head]`` attention of each prompt's last token to the last token of the
    subject occurrence at or after its character offset, for ``(text, offset)`` rows, in one
    batched forward (:func:`~attention_drift.measure.drift.collect_attention_rows`)."""
    attention = collect_attention_rows(model, [text for text, _ in rows]).rows
    positions = [subject_last_index(model, text, subject, start) for text, start in rows]
    return torch.stack([attention[i, :, :, p] for i, p in enumerate(positions)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--records", type=int, default=20, help="first N CounterFact-type records of dev-tune")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    records = data.load_dev(half="tune", kinds=["counterfact"])[: args.records]
    sums = {kind: torch.zeros(model.cfg.n_layers, model.cfg.n_heads) for kind in ("own", "paraphrase", "mention")}
    counts = dict.fromkeys(sums, 0)
    with torch.no_grad():
        for record in records:
            rw = record.rewrite
            rows = [("own", rw.prompt, 0)]
            rows += [("paraphrase", q, q.find(rw.subject)) for q in record.paraphrase.prompts if rw.subject in q]
            rows += [("mention", q, 0) for q in distract_prompts(rw, forms=("mention",))]
            attention = subject_attention(model, [(text, start) for _, text, start in rows], rw.subject)
            for (kind, _, _), heads in zip(rows, attention):
                sums[kind] += heads.cpu()
                counts[kind] += 1
    means = {kind: sums[kind] / max(counts[kind], 1) for kind in sums}
    print(f"{args.model}, first {len(records)} CounterFact-type dev-tune records; prompts: "
          + ", ".join(f"{kind} {n}" for kind, n in counts.items()))
    print("head    own  paraphrase  mention   (mean attention of the last token to the subject's last token)")
    for layer, head in DRIFT_HEADS:
        print(f"L{layer}H{head}  " + "  ".join(f"{means[k][layer, head]:.3f}" for k in means))
    print("top readers in own prompts: " + ", ".join(
        f"L{layer}H{head} {value:.3f}" for layer, head, value in ranked_heads(means["own"], args.top)))


if __name__ == "__main__":
    main()
