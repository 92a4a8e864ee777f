"""Small scoring helpers shared by the editing benchmarks (not part of the package).

A prompt counts as correct when the mean per-token probability of its right answer beats
the wrong one's (``tokens.target_log_probs``), as in the paper; groups are pooled over
prompts (micro-average).
"""

import torch

from attention_drift.core import tokens


@torch.no_grad()
def wins(model, prompts, right, wrong) -> list[bool]:
    if not prompts:
        return []
    batch = tokens.batch_with_targets(model, list(prompts) * 2, list(right) + list(wrong))
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    lp = tokens.target_log_probs(logits, batch)
    n = len(prompts)
    return (lp[:n] > lp[n:]).tolist()


def score(model, record) -> dict[str, list[bool]]:
    """Per group, correctness of each prompt: efficacy, paraphrase (+ subject alias),
    neighbourhood and relation (right: own answer, wrong: the new target)."""
    rw = record.rewrite
    out = {"efficacy": wins(model, record.efficacy.prompts, record.efficacy.targets,
                            [rw.target_true] * len(record.efficacy))}
    para = record.paraphrase.prompts + record.subject_alias.prompts
    out["paraphrase"] = wins(model, para, [rw.target_new] * len(para), [rw.target_true] * len(para))
    out["neighborhood"] = wins(model, record.neighborhood.prompts, record.neighborhood.targets,
                               [rw.target_new] * len(record.neighborhood))
    out["relation"] = wins(model, record.relation.prompts, record.relation.targets,
                           [rw.target_new] * len(record.relation))
    return out


def pooled(scores: list[dict[str, list[bool]]]) -> dict[str, float]:
    """Percent correct per group over all prompts of all records."""
    result = {}
    for group in ("efficacy", "paraphrase", "neighborhood", "relation"):
        flat = [x for s in scores for x in s.get(group, [])]
        result[group] = 100.0 * sum(flat) / len(flat) if flat else float("nan")
    return result
