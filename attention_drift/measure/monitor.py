"""What a sequence of edits has done so far, measured at a checkpoint: retention, specificity on
a probe set, and per-head attention drift against the unedited model.

Every number is one the single-edit measurements already define, so a checkpoint reads like an
``evaluate`` / ``drift`` run of the model as it is now:

* **retention** (:func:`retention`): the efficacy and paraphrase groups of every edit so far,
  scored on the current model (:func:`~attention_drift.measure.evaluate.evaluate_record`'s
  protocol: correct when P(target_new) > P(target_true), geometric-mean token probabilities):
  the field's "edit success after t edits";
* **specificity** (:func:`probe_scores`): the probe records' neighbourhood / relation groups and
  their distract versions (NS, DNS, RS, distract relation), CounterFact+'s NKL against the
  unedited model's next-token distributions (:func:`probe_baseline`), and ROME's fluency
  (n-gram entropy of sampled generations) on the first probes that have generation prompts.
  The probes are records no edit touches, so what they lose is collateral damage;
* **head drift** (:func:`head_drift`): :func:`~attention_drift.measure.drift.drift_record` of
  edited records, with the unedited model as *before* and the sequence's current weights (a
  :class:`~attention_drift.editing.external.WeightSwap`) as the edit: the same per-head attention
  mass on the edited subject's last token as ``attention-drift drift`` reports, averaged over the
  records' distract prompts, and how many heads' mean crosses ``drift_threshold``.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attention_drift.core.data import PromptGroup, Record
from attention_drift.core.errors import AttentionDriftError
from attention_drift.measure.drift import DEFAULT_GROUPS, RecordDrift, drift_record, record_prompts
from attention_drift.measure.evaluate import FluencyStats, RecordScores, aggregate, aggregate_metrics, evaluate_records
from attention_drift.measure.fluency import FluencyConfig, generate_texts, ngram_entropy

RETENTION_GROUPS = ("efficacy", "paraphrase")
PROBE_GROUPS = ("neighborhood", "distract_neighborhood", "relation", "distract_relation")


class MonitorError(AttentionDriftError):
    """A monitor that cannot measure what it was asked; the message says what to change."""


@dataclass(frozen=True)
class MonitorConfig:
    """What a sequence measures at each checkpoint.

    Args:
        every: edits between two checkpoints (a checkpoint also follows the last edit).
        drift_records: per checkpoint, head drift is measured on the distract prompts of this many
            edited records with such prompts: the first ones edited (the same records at every
            checkpoint: does their drift grow as edits pile up?) and, separately, the latest ones
            (does a new edit drift more in a model edited many times?). 0: no head drift.
        drift_threshold: a head counts as drifting when its mean change of attention mass on the
            edited subject's last token exceeds this (``drift.json``'s default threshold).
        probe_prompts: each probe record contributes the first this-many prompts of each of its
            groups (None: all), so that a checkpoint stays cheap beside the edits it follows.
        fluency_records: fluency is sampled on the first generation prompt of this many probes
            (those that have one), in one batch; 0: none.
        fluency: how generations are sampled (50 tokens: cheap enough to run every checkpoint on
            a CPU; the paper's is 10 prompts of 100 tokens per record).
        batch_size: sequences per forward pass.
    """

    every: int = 20
    drift_records: int = 5
    drift_threshold: float = 0.05
    probe_prompts: int | None = 3
    fluency_records: int = 10
    fluency: FluencyConfig = field(default_factory=lambda: FluencyConfig(max_prompts=1, max_length=50))
    batch_size: int = 32

    def __post_init__(self):
        for name in ("every", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MonitorError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}", fields=(name,))
        for name in ("drift_records", "fluency_records"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise MonitorError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}", fields=(name,))
        if self.probe_prompts is not None and (not isinstance(self.probe_prompts, int) or self.probe_prompts < 1):
            raise MonitorError(f"probe_prompts must be None or an integer >= 1, got {self.probe_prompts!r}",
                               fields=("probe_prompts",))
        if not self.drift_threshold > 0:
            raise MonitorError(f"drift_threshold must be > 0, got {self.drift_threshold!r}", fields=("drift_threshold",))

    def to_json(self) -> dict:
        return {"every": self.every, "drift_records": self.drift_records, "drift_threshold": self.drift_threshold,
                "probe_prompts": self.probe_prompts, "fluency_records": self.fluency_records,
                "fluency": self.fluency.to_json()}


def check_probes(probes: Sequence[Record], edits: Sequence[Record]) -> None:
    """A :class:`MonitorError` when the probe set is empty, has nothing to score, or shares a
    record (case_id) or an edited subject with ``edits``."""
    if not probes:
        raise MonitorError("the probe set is empty; give records that no edit touches", fields=("probes",))
    if not any(r.neighborhood.prompts or r.relation.prompts for r in probes):
        raise MonitorError("no probe record has neighbourhood or relation prompts, so specificity has nothing to "
                           "score; choose probes with them (CounterFact-type records)", fields=("probes",))
    edited_ids = {str(r.case_id) for r in edits}
    edited_subjects = {r.rewrite.subject for r in edits}
    shared = [r.case_id for r in probes if str(r.case_id) in edited_ids or r.rewrite.subject in edited_subjects]
    if shared:
        raise MonitorError(f"the probe set overlaps the edits (case_ids {shared[:5]}: the same record or an edited "
                           "subject); probes must be records no edit touches", fields=("probes",))


def probe_view(record: Record, config: MonitorConfig) -> Record:
    """``record`` with each neighbourhood / relation group cut to its first ``config.probe_prompts``
    prompts (the prompts every checkpoint scores)."""
    if config.probe_prompts is None:
        return record
    k = config.probe_prompts
    cut = {name: PromptGroup(getattr(record, name).prompts[:k], getattr(record, name).targets[:k])
           for name in ("neighborhood", "relation")}
    return dataclasses.replace(record, **cut)


def probe_baseline(model, probes: Sequence[Record], config: MonitorConfig) -> list[RecordScores]:
    """The probes' scores on the unedited ``model`` (kept in memory with the next-token
    distributions NKL compares with)."""
    return evaluate_records(model, [probe_view(r, config) for r in probes], batch_size=config.batch_size,
                            groups=PROBE_GROUPS)


def probe_scores(model, probes: Sequence[Record], baseline: Sequence[RecordScores], config: MonitorConfig) -> dict:
    """Specificity of the current ``model`` on the probes: ``{"groups": {GROUP: GroupStats json},
    "metrics": {METRIC: MetricStats json}, "fluency": {"ngram_entropy", "n"} | None}`` (pooled over
    prompts; NKL against ``baseline``)."""
    scores = evaluate_records(model, [probe_view(r, config) for r in probes], batch_size=config.batch_size,
                              pre=baseline, groups=PROBE_GROUPS)
    return {"groups": {k: v.to_json() for k, v in aggregate(scores).items()},
            "metrics": {k: v.to_json() for k, v in aggregate_metrics(scores).items()},
            "fluency": fluency(model, probes, config)}


def fluency(model, probes: Sequence[Record], config: MonitorConfig) -> dict | None:
    """Mean n-gram entropy (ROME's fluency, :func:`~attention_drift.measure.evaluate.ngram_entropy`) of
    generations from the first generation prompt of the first ``config.fluency_records`` probes
    that have one, sampled together (seeded, so every checkpoint samples alike); None without any."""
    prompts = [r.generation[0] for r in probes if r.generation][: config.fluency_records]
    if not prompts:
        return None
    entropies = [ngram_entropy(t) for t in generate_texts(model, prompts, config.fluency)]
    return FluencyStats(sum(entropies) / len(entropies), len(entropies)).to_json()


def retention(model, edited: Sequence[Record], config: MonitorConfig) -> dict:
    """Efficacy and paraphrase of every record in ``edited`` on the current ``model``:
    ``{"groups": {...}, "efficacy_by_edit": [fraction correct of each edit's efficacy prompts]}``."""
    scores = evaluate_records(model, edited, batch_size=config.batch_size, groups=RETENTION_GROUPS, metrics=False)
    by_edit = [sum(s.groups["efficacy"].correct) / len(s.groups["efficacy"]) if len(s.groups.get("efficacy", ())) else None
               for s in scores]
    return {"groups": {k: v.to_json() for k, v in aggregate(scores).items()}, "efficacy_by_edit": by_edit}


def drift_candidates(edited: Sequence[Record], k: int) -> tuple[list[Record], list[Record]]:
    """(the first ``k``, the latest ``k``) of ``edited`` that have distract prompts containing
    their subject (:func:`~attention_drift.measure.drift.record_prompts`)."""
    usable = [r for r in edited if record_prompts(r, DEFAULT_GROUPS)[0]]
    return usable[:k], usable[-k:] if k else []


def head_drift(model, records: Sequence[Record], swap, threshold: float) -> dict | None:
    """Per-head drift of ``records`` between the unedited ``model`` (as it must be when called) and
    ``swap`` (the current weights, entered once per record), summarised over their distract prompts:
    ``{"records", "prompts", "delta_subject_last": [layer][head] mean change of attention mass on
    the subject's last token, "kl": [layer][head] mean KL(before || after), "max_delta", "sum_delta",
    "heads_above", "failure_rate"}`` (failure: right before the edit, wrong after; over those
    right before). None without records."""
    measured = [d for r in records if (d := drift_record(model, r, swap)) is not None]
    return summarize_drift(measured, threshold) if measured else None


def summarize_drift(measured: Sequence[RecordDrift], threshold: float) -> dict:
    """The summary :func:`head_drift` returns, from :class:`~attention_drift.measure.drift.RecordDrift` values."""
    delta = torch.cat([(d.subject_last_after - d.subject_last_before).double() for d in measured])
    kl = torch.cat([d.kl.double() for d in measured])
    mean = delta.nanmean(0)
    right = [s for d in measured for s in d.samples if s.right_before]
    return {"records": len(measured), "prompts": int(delta.shape[0]),
            "delta_subject_last": mean.tolist(), "kl": kl.nanmean(0).tolist(),
            "max_delta": float(mean.max()), "sum_delta": float(mean.sum()),
            "heads_above": int((mean > threshold).sum()),
            "failure_rate": sum(s.fails for s in right) / len(right) if right else math.nan}
