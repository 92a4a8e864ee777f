"""The case study's prompt, picked from a drift report by a stated rule (:data:`CASE_RULE`).

:func:`pick_case` reads the samples of a drift run file (``drift_records.jsonl``) or of
``drift.json`` (the same sample dicts), so the committed report is enough to pick it.
"""

import json
from pathlib import Path

from attention_drift.core.errors import AttentionDriftError


class CasePickError(AttentionDriftError):
    """A drift source without samples to pick from; the message says what to give."""


CASE_RULE = (
    "the distract-neighbourhood prompt with the largest log-odds(true vs new) drop among those the unedited model "
    "got right (P(true) ≥ P(new)) and whose true answer does not occur in the prompt itself (case-insensitive; "
    "a model could copy such an answer from the context, e.g. 'London' from a subject named 'London ... Festival'): "
    "taken first from the prompts whose true answer was the unedited model's top-1 token and that the edit made "
    "fail, else from those the edit made fail, else from all such prompts right before the edit")
"""How :func:`pick_case` chooses the case study (stated in ``figures.md``)."""
CASE_TIERS = ("knew it (top-1) and failed", "right before and failed", "right before")


def answer_in_prompt(sample: dict) -> bool:
    """Whether the sample's true answer (stripped, case-insensitive) occurs in its prompt text."""
    answer = sample["target_true"].strip().lower()
    return bool(answer) and answer in sample["prompt"].lower()


def _drift_samples(source: Path | str | dict) -> list[dict]:
    """The samples of a drift run file (``drift_records.jsonl``), a ``drift.json`` path or its content."""
    from attention_drift.core.jsonl import read_run

    if isinstance(source, dict):
        if "samples" not in source:
            raise CasePickError("the drift report has no 'samples'; give drift.json written by 'attention-drift drift'")
        return list(source["samples"])
    path = Path(source)
    if not path.is_file():
        raise CasePickError(f"no drift run file or drift.json at {path}")
    if path.suffix == ".json":
        return _drift_samples(json.loads(path.read_text()))
    return [s for line in read_run(path).records for s in line.get("samples", [])]


def pick_case(source: Path | str | dict) -> dict | None:
    """The drift sample for the case study, chosen by :data:`CASE_RULE` (failure as
    :class:`attention_drift.measure.drift.Outcome` defines it) from ``source``: a drift run file
    (``drift_records.jsonl``), a ``drift.json`` path, or its content (the same sample dicts);
    None when no eligible distract-neighbourhood prompt was right before the edit. The sample
    dict gains ``"pick"``: ``{"rule", "tier" (of :data:`CASE_TIERS`), "candidates" (prompts in
    that tier), "right_before" (eligible prompts right before the edit), "prompts",
    "answer_in_prompt" (prompts excluded because their true answer occurs in them)}``."""
    from attention_drift.measure.drift import DriftSample

    samples = [s for s in _drift_samples(source) if s["group"] == "distract_neighborhood"]
    eligible = [s for s in samples if not answer_in_prompt(s)]
    right = [(s, d) for s, d in ((s, DriftSample.from_dict(s)) for s in eligible) if d.right_before]
    tiers = ([(s, d) for s, d in right if d.flipped and d.true_top1_before], [(s, d) for s, d in right if d.flipped],
             right)
    for tier, candidates in zip(CASE_TIERS, tiers):
        if candidates:
            best, _ = max(candidates, key=lambda sd: sd[1].severity["logodds_drop"])
            return {**best, "pick": {"rule": CASE_RULE, "tier": tier, "candidates": len(candidates),
                                     "right_before": len(right), "prompts": len(samples),
                                     "answer_in_prompt": len(samples) - len(eligible)}}
    return None


__all__ = ["CASE_RULE", "CASE_TIERS", "CasePickError", "answer_in_prompt", "pick_case"]
