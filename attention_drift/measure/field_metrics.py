"""The field's editing metrics beside the paper's: CounterFact+'s neighbourhood KL and EasyEdit's
token-level accuracies (:data:`METRICS`; each one's description says exactly how it is computed).

They are read from the forward passes the paper's groups already make
(:func:`~attention_drift.measure.evaluate.evaluate_record` asks :func:`~attention_drift.core.scores.score_pairs` for the
argmax tokens and the few next-token distributions they need), so they cost no extra forward pass
and are on by default. Two compare the edited model with the unedited one and need the pre-edit pass:

* locality token accuracy reads the pre-edit argmax tokens on the neighbourhood prompts' true
  answers, a few ints per prompt kept in the run file (``"reference"``, :func:`record_reference`);
* NKL reads the pre-edit next-token distributions of the distract-neighbourhood prompts over the
  whole vocabulary (exact). They are too big for a run file (~50k floats per prompt), and keeping
  only the top-k tokens plus one bucket for the rest was tried on SmolLM2 / ROME and is no good:
  the top 50 caught 89% of the mean KL and as little as 18% on single prompts (the edit moves
  mass inside the tail). So the pre-edit pass keeps them in memory
  (``RecordScores.next_token``, never written) for the post-edit pass of the same record; where
  the pre-edit scores come from elsewhere (``evaluate --reuse-pre``, a sweep's shared pre-edit
  pass) the run re-reads just those distributions from the unedited model before editing, one
  small forward (:func:`~attention_drift.measure.evaluate.pre_edit_distributions`).

Sources: Hoelscher-Obermaier et al. 2023, "Detecting Edit Failures In Large Language Models: An
Improved Specificity Benchmark" (CounterFact+, github.com/apartresearch/specificityplus:
``experiments/py/eval_utils_counterfact.py``, ``experiments/e2e_analyze.py``); EasyEdit
(github.com/zjunlp/EasyEdit: ``easyeditor/evaluate/evaluate_utils.py`` ``test_prediction_acc``,
``easyeditor/evaluate/evaluate.py``, ``easyeditor/editors/editor.py`` ``finalize_locality_metrics``).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Z95 = 1.96


@dataclass(frozen=True)
class Metric:
    """One metric of the field, scored per prompt.

    Args:
        name: key in results and JSON (``"nkl"``, ``"rewrite_token_acc"``...).
        abbrev: the usual abbreviation ("" where there is none).
        description: exactly how it is computed, and where it comes from.
        lower_is_better: True for NKL (a divergence), False for the accuracies.
        needs_pre: scored only in a post-edit pass that is handed the pre-edit pass (its
            pre-edit value would be 0 or 1 by construction and is not stored).
    """

    name: str
    abbrev: str
    description: str
    lower_is_better: bool = False
    needs_pre: bool = False


NKL = Metric("nkl", "NKL", (
    "Neighbourhood KL divergence (CounterFact+, Hoelscher-Obermaier et al. 2023): per distract-"
    "neighbourhood prompt (the neighbour prompt with the edit sentence in front, "
    "f'{rewrite prompt} {target_new}. {prompt}', the same string CounterFact+ builds), the KL "
    "divergence KL(P_post || P_pre) in nats between the post- and pre-edit next-token distributions "
    "after the prompt's last token -- the direction of CounterFact+'s code, "
    "torch.nn.functional.kl_div(pre log-probs, post log-probs, log_target=True). Its published "
    "values are these divided by the vocabulary size (reduction='batchmean' on a 1-D tensor). "
    "Full vocabulary, float64 sums of float32 log-softmaxes; exactly 0 when the model is unchanged. "
    "Averaged over prompts (CounterFact+ averages per record, then over records: the same with "
    "equal prompt counts); lower is better. Post-edit only."),
    lower_is_better=True, needs_pre=True)
REWRITE_TOKEN_ACC = Metric("rewrite_token_acc", "", (
    "Rewrite token accuracy (EasyEdit's rewrite_acc, test_prediction_acc): on each rewrite prompt, "
    "f'{prompt} {target_new}' teacher-forced; the fraction of target_new's tokens that are the "
    "argmax of the logits at the position predicting them (prompt and earlier target tokens "
    "given). Averaged over prompts (one value per prompt, as EasyEdit); higher is better."))
PARAPHRASE_TOKEN_ACC = Metric("paraphrase_token_acc", "", (
    "Paraphrase token accuracy (EasyEdit's rephrase_acc): rewrite token accuracy on the "
    "p-paraphrase prompts with target_new."))
LOCALITY_TOKEN_ACC = Metric("locality_token_acc", "", (
    "Locality token accuracy (EasyEdit's locality_acc): on each l-neighbor prompt, "
    "f'{prompt} {own true answer}' teacher-forced before and after the edit; the fraction of the "
    "answer's token positions where the post-edit argmax equals the pre-edit argmax (agreement "
    "with the unedited model, not with the answer). Averaged over prompts; higher is better. "
    "Post-edit only, from the pre-edit pass's argmax tokens."), needs_pre=True)

METRICS: dict[str, Metric] = {m.name: m for m in (NKL, REWRITE_TOKEN_ACC, PARAPHRASE_TOKEN_ACC, LOCALITY_TOKEN_ACC)}
TOKEN_ACC_GROUPS = {"rewrite_token_acc": "efficacy", "paraphrase_token_acc": "paraphrase"}
"""Which group's pairs each target_new token accuracy reads (right continuation = target_new)."""


@dataclass(frozen=True)
class MetricScores:
    """One record's values of one metric, one per scored prompt, in data order."""

    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.values)

    def to_json(self) -> dict:
        return {"values": list(self.values)}

    @classmethod
    def from_json(cls, obj: dict) -> "MetricScores":
        return cls(tuple(float(v) for v in obj.get("values", ())))


# --- per prompt -----------------------------------------------------------------------------

def token_accuracy(target_ids: Sequence[int], argmax_ids: Sequence[int]) -> float:
    """Fraction of target tokens that are the teacher-forced argmax (EasyEdit's test_prediction_acc;
    for locality, ``target_ids`` are the pre-edit argmax tokens)."""
    if len(target_ids) != len(argmax_ids) or not target_ids:
        raise ValueError(f"need one argmax per target token, got {len(argmax_ids)} for {len(target_ids)}")
    return sum(int(a) == int(t) for a, t in zip(argmax_ids, target_ids)) / len(target_ids)


def kl_divergence(post_log_probs: Tensor, pre_log_probs: Tensor) -> float:
    """KL(post || pre) in nats of two next-token distributions given as full log-softmaxes,
    summed in float64 (clipped at 0 against rounding): CounterFact+'s
    ``kl_div(pre, post, log_target=True)`` with reduction ``sum``."""
    lq, lp = post_log_probs.double(), pre_log_probs.double()
    if lq.shape != lp.shape:
        raise ValueError(f"distributions over different vocabularies: {tuple(lq.shape)} and {tuple(lp.shape)}")
    q = lq.exp()
    terms = torch.where(q > 0, q * (lq - lp), torch.zeros_like(q))
    return max(0.0, float(terms.sum()))


# --- one record -----------------------------------------------------------------------------

def record_metrics(slices: dict[str, range], right_ids, right_argmax, next_token: dict[str, Tensor],
                   distract_prompts: Sequence[str], pre_argmax: Sequence[Sequence[int]] | None = None,
                   pre_next_token: dict[str, Tensor] | None = None) -> dict[str, MetricScores]:
    """Every metric of one record from one pass's :class:`~attention_drift.core.scores.PairScores`
    fields (``slices``: each group's pair indices in them; ``distract_prompts``: the
    distract-neighbourhood prompts, in order). Locality only with ``pre_argmax`` (the pre-edit
    pass's :func:`record_reference` ``"argmax"``) and NKL only with ``pre_next_token`` (its
    next-token distributions), each where they match the record's prompts; metrics without a
    prompt are left out."""
    out: dict[str, MetricScores] = {}
    if right_ids is None or right_argmax is None:
        return out
    for name, group in TOKEN_ACC_GROUPS.items():
        values = [token_accuracy(right_ids[i], right_argmax[i]) for i in slices.get(group, ())]
        if values:
            out[name] = MetricScores(tuple(values))
    neighbours = slices.get("neighborhood", range(0))
    before = list(pre_argmax or [])
    if len(neighbours) and len(before) == len(neighbours) and all(
            len(b) == len(right_argmax[i]) for b, i in zip(before, neighbours)):
        out["locality_token_acc"] = MetricScores(tuple(
            token_accuracy(b, right_argmax[i]) for b, i in zip(before, neighbours)))
    pre_next_token = pre_next_token or {}
    if distract_prompts and all(p in next_token and p in pre_next_token for p in distract_prompts):
        out["nkl"] = MetricScores(tuple(kl_divergence(next_token[p], pre_next_token[p]) for p in distract_prompts))
    return out


def record_reference(slices: dict[str, range], right_argmax) -> dict:
    """What a post-edit pass reads from this (pre-edit) pass's run line: ``{"argmax": [[ids] per
    neighbourhood prompt]}``, the teacher-forced argmax tokens on their true answers ({} when the
    record has no neighbourhood prompt)."""
    if right_argmax is None or not len(slices.get("neighborhood", ())):
        return {}
    return {"argmax": [list(right_argmax[i]) for i in slices["neighborhood"]]}


# --- aggregation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricStats:
    """Mean of one metric over many records.

    Pooled (default): mean of the values of all prompts of all records, half_width = 1.96 *
    std / sqrt(n) over the n prompts (population std). Per record: the same over the n records'
    means. ``ci95`` is mean -/+ half_width, clipped to [0, 1] for accuracies and at 0 for NKL.
    """

    mean: float
    ci95: tuple[float, float]
    half_width: float
    n: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "ci95": list(self.ci95), "half_width": self.half_width, "n": self.n}


def metric_stats(metric: Metric, per_record_values: Sequence[Sequence[float]], *,
                 per_record: bool = False) -> MetricStats | None:
    """:class:`MetricStats` of ``metric`` from each record's values (records without values are
    skipped); None when no record has one."""
    present = [list(v) for v in per_record_values if len(v)]
    if not present:
        return None
    values = [sum(v) / len(v) for v in present] if per_record else [x for v in present for x in v]
    n = len(values)
    mean = sum(values) / n
    half = Z95 * math.sqrt(sum((x - mean) ** 2 for x in values) / n / n)
    high = math.inf if metric.lower_is_better else 1.0
    return MetricStats(mean, (max(0.0, mean - half), min(high, mean + half)), half, n)
