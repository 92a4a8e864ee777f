"""Evaluate a (possibly edited) model on a CounterFact-family record, the over-attention paper's way.

Protocol (Revealing and Mitigating Over-Attention in Knowledge Editing, ICLR 2025, which follows
ROME's CounterFact evaluation):

* A prompt is scored by two continuations, ``right`` and ``wrong``. Each is appended to the
  prompt (``f"{prompt} {target}"``, :mod:`attention_drift.core.tokens`) and gets its mean
  log-probability per target token; ``p = exp(mean log-prob)`` is the geometric-mean token
  probability. The prompt is *correct* when ``p_right > p_wrong`` (strict; compared in log space,
  which orders the same way and cannot underflow into a tie).
* Which continuation is right or wrong depends on the group (see :data:`GROUPS`, defined with
  the prompt pairs they score in :mod:`attention_drift.measure.groups`); the distract suite's
  groups (:data:`SUITE_GROUPS`) are scored only when asked for.
* Results are pooled over all prompts of all records (micro-average) with a 95% normal interval,
  see :func:`aggregate`; Avg.S is the harmonic mean of ES, PS, NS, RS and DNS (:func:`avg_s`).
* Fluency (FL) is ROME's n-gram entropy of sampled generations (:func:`ngram_entropy`).

Beside the paper's groups, the field's metrics (:data:`~attention_drift.measure.field_metrics.METRICS`:
CounterFact+'s neighbourhood KL, EasyEdit's token-level rewrite / paraphrase / locality accuracy)
are read from the same forward passes; the ones that compare with the unedited model need the
pre-edit pass (``evaluate_record(..., pre=...)``).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from attention_drift.core.scores import check_batch_size, score_pairs
from attention_drift.core.data import Record
from attention_drift.core.models import on_model_device
from attention_drift.measure import field_metrics
from attention_drift.measure.field_metrics import METRICS, MetricScores, MetricStats, metric_stats
from attention_drift.measure.fluency import FluencyConfig, FluencyScores, generate_texts, ngram_entropy
from attention_drift.measure.groups import (  # noqa: F401 (GROUPS and record_pairs are read from here too)
    AVG_S_GROUPS, BASE_GROUPS, GROUPS, SUITE_GROUPS, Group, Pair, record_pairs)


@dataclass(frozen=True)
class GroupScores:
    """One record's results in one group, one entry per scored prompt, in data order.

    ``skipped`` counts pairs left out because right == wrong after stripping.
    """

    p_right: tuple[float, ...]
    p_wrong: tuple[float, ...]
    correct: tuple[bool, ...]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.correct)

    def to_json(self) -> dict:
        return {"scores": [[r, w, c] for r, w, c in zip(self.p_right, self.p_wrong, self.correct)],
                "skipped": self.skipped}

    @classmethod
    def from_json(cls, obj: dict) -> "GroupScores":
        rows = obj.get("scores", [])
        return cls(tuple(float(r[0]) for r in rows), tuple(float(r[1]) for r in rows),
                   tuple(bool(r[2]) for r in rows), int(obj.get("skipped", 0)))


@dataclass(frozen=True)
class RecordScores:
    """All results of one record in one model state (pre- or post-edit).

    ``metrics``: the field's metrics (:data:`~attention_drift.measure.field_metrics.METRICS`);
    ``reference``: what a post-edit pass reads from this pre-edit one's run line
    (:func:`~attention_drift.measure.field_metrics.record_reference`), None in a post-edit pass;
    both absent from run files written before they existed. ``next_token``: a pre-edit pass's
    next-token distributions of the distract-neighbourhood prompts (NKL's reference), in memory
    only, never written (:mod:`~attention_drift.measure.field_metrics` says why).
    """

    case_id: int | str
    groups: dict[str, GroupScores] = field(default_factory=dict)
    fluency: FluencyScores | None = None
    metrics: dict[str, MetricScores] = field(default_factory=dict)
    reference: dict | None = None
    next_token: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        out = {"groups": {name: g.to_json() for name, g in self.groups.items()},
               "fluency": None if self.fluency is None else self.fluency.to_json()}
        if self.metrics:
            out["metrics"] = {name: m.to_json() for name, m in self.metrics.items()}
        if self.reference:
            out["reference"] = self.reference
        return out

    @classmethod
    def from_json(cls, case_id: int | str, obj: dict) -> "RecordScores":
        fluency = obj.get("fluency")
        return cls(case_id, {name: GroupScores.from_json(g) for name, g in obj.get("groups", {}).items()},
                   None if fluency is None else FluencyScores.from_json(fluency),
                   {name: MetricScores.from_json(m) for name, m in (obj.get("metrics") or {}).items()},
                   obj.get("reference") or None)


def evaluate_record(
    model, record: Record, *, batch_size: int = 32, fluency: bool | FluencyConfig = False,
    pre: "RecordScores | dict | None" = None, metrics: bool = True, groups: Sequence[str] | None = None,
) -> RecordScores:
    """Score every group of ``record`` on ``model`` as it is now (pre- or post-edit).

    All prompt pairs of all groups go through shared batched forwards. Groups without prompts
    are left out. ``fluency=True`` (or a :class:`FluencyConfig`) also samples generations from
    the record's generation prompts and scores their n-gram entropy (slow on CPU).

    ``metrics`` (default on: no extra forward pass, a few ints per neighbourhood prompt in a run
    file): the field's metrics (:data:`~attention_drift.measure.field_metrics.METRICS`) from the
    same forwards. Without ``pre`` this is a pre-edit pass: it also keeps what a post-edit pass
    compares with (``reference``, and in memory ``next_token``). With ``pre`` (the pre-edit
    :class:`RecordScores`, or its JSON, e.g. a run line's ``"pre"``) it is a post-edit pass and
    also scores locality token accuracy (needs ``pre``'s reference, absent from older run files)
    and NKL (needs ``pre.next_token``: a :class:`RecordScores` from a pre-edit pass of this
    process, or one given them by :func:`pre_edit_distributions`).

    ``groups``: score these of :data:`GROUPS` (default :data:`BASE_GROUPS`: all but the opt-in
    distract suite, :data:`SUITE_GROUPS`; the field's metrics read the groups they need where
    present, e.g. NKL needs ``distract_neighborhood``).
    """
    ordered_groups(groups)
    with on_model_device(model):
        return _evaluate_record(model, record, batch_size, fluency, pre, metrics, groups)


def _pre_fields(pre: "RecordScores | dict | None") -> tuple[list | None, dict]:
    """``pre``'s argmax reference and next-token distributions (None / {} where it has none)."""
    if pre is None:
        return None, {}
    if isinstance(pre, RecordScores):
        return (pre.reference or {}).get("argmax"), pre.next_token
    return (pre.get("reference") or {}).get("argmax"), {}


def pre_edit_distributions(model, record: Record, pre: "RecordScores | dict", *, batch_size: int = 32) -> RecordScores:
    """``pre`` as a :class:`RecordScores` with the next-token distributions NKL compares with,
    read now from ``model`` (which must be unedited) when ``pre`` has none: for pre-edit scores
    reused from a run file. One forward of the record's distract-neighbourhood pairs (the same
    reading as in a full pass; batched differently, so equal to it up to float rounding)."""
    scores = pre if isinstance(pre, RecordScores) else RecordScores.from_json(record.case_id, pre)
    pairs = record_pairs(record)[0]["distract_neighborhood"]
    if scores.next_token or not pairs:
        return scores
    prompts = [p.prompt for p in pairs]
    with on_model_device(model):
        read = score_pairs(model, prompts, [p.right for p in pairs], [p.wrong for p in pairs],
                           batch_size=batch_size, next_token=prompts)
    return replace(scores, next_token=read.next_token)


def evaluate_records(
    model, records: Sequence[Record], *, batch_size: int = 32, pre: "Sequence[RecordScores | dict | None] | None" = None,
    metrics: bool = True, groups: Sequence[str] | None = None,
) -> list[RecordScores]:
    """:func:`evaluate_record` of several records (no fluency) with all their prompt pairs in shared
    batched forwards: the same numbers up to float rounding (the batches are padded differently),
    fewer, fuller forwards for records with few prompts (a sequence's monitor). ``pre``: one per record."""
    pre = [None] * len(records) if pre is None else list(pre)
    if len(pre) != len(records):
        raise ValueError(f"got {len(pre)} pre-edit scores for {len(records)} records; give one per record")
    ordered_groups(groups)
    with on_model_device(model):
        return _evaluate_records(model, records, batch_size, pre, metrics, groups)


def ordered_groups(groups: Sequence[str] | None) -> list[str] | None:
    """``groups`` checked (one or more names of :data:`GROUPS`, else a ValueError that lists them)
    and put in :data:`GROUPS` order; None stays None (the default groups)."""
    if groups is not None and (not groups or set(groups) - set(GROUPS)):
        raise ValueError(f"groups {list(groups)}: choose one or more of {', '.join(GROUPS)}")
    return None if groups is None else [g for g in GROUPS if g in groups]


def _evaluate_records(model, records: Sequence[Record], batch_size: int, pres: Sequence, metrics: bool = True,
                      only: Sequence[str] | None = None) -> list[RecordScores]:
    check_batch_size(batch_size)
    only = BASE_GROUPS if only is None else only
    per_record, flat, distract = [], [], []
    for record in records:
        pairs, skipped = record_pairs(record)
        pairs = {name: ps if name in only else [] for name, ps in pairs.items()}
        skipped = {name: k if name in only else 0 for name, k in skipped.items()}
        per_record.append((pairs, skipped, len(flat)))
        flat += [p for name in GROUPS for p in pairs[name]]
        if metrics:
            distract += [p.prompt for p in pairs["distract_neighborhood"]]
    scores = score_pairs(model, [p.prompt for p in flat], [p.right for p in flat], [p.wrong for p in flat],
                         batch_size=batch_size, next_token=distract)
    p_right, p_wrong, correct = scores.p_right.tolist(), scores.p_wrong.tolist(), scores.correct.tolist()
    out = []
    for record, pre, (pairs, skipped, start) in zip(records, pres, per_record):
        groups: dict[str, GroupScores] = {}
        slices: dict[str, range] = {}
        for name in GROUPS:
            n = len(pairs[name])
            if n or skipped[name]:
                stop = start + n
                groups[name] = GroupScores(tuple(p_right[start:stop]), tuple(p_wrong[start:stop]),
                                           tuple(correct[start:stop]), skipped[name])
                slices[name] = range(start, stop)
                start = stop
        field_scores: dict[str, MetricScores] = {}
        reference, kept = None, {}
        if metrics:
            mine = [p.prompt for p in pairs["distract_neighborhood"]]
            field_scores = field_metrics.record_metrics(slices, scores.right_ids, scores.right_argmax,
                                                        scores.next_token, mine, *_pre_fields(pre))
            if pre is None:
                reference = field_metrics.record_reference(slices, scores.right_argmax) or None
                kept = {p: scores.next_token[p] for p in mine if p in scores.next_token}
        out.append(RecordScores(record.case_id, groups, None, field_scores, reference, kept))
    return out


def _evaluate_record(model, record: Record, batch_size: int, fluency: bool | FluencyConfig,
                     pre: "RecordScores | dict | None" = None, metrics: bool = True,
                     only: Sequence[str] | None = None) -> RecordScores:
    scores = _evaluate_records(model, [record], batch_size, [pre], metrics, only)[0]
    if fluency is not False and record.generation:
        config = fluency if isinstance(fluency, FluencyConfig) else FluencyConfig()
        prompts = list(record.generation[: config.max_prompts])
        texts = generate_texts(model, prompts, config)
        scores = replace(scores, fluency=FluencyScores(tuple(texts), tuple(ngram_entropy(t) for t in texts)))
    return scores


# --- aggregation ---------------------------------------------------------------------------

Z95 = 1.96


@dataclass(frozen=True)
class GroupStats:
    """Accuracy of one group over many records.

    Pooled (default, the paper's): accuracy = mean of the correct flags of all prompts of all
    records, half_width = 1.96 * sqrt(p (1 - p) / n) with n prompts. Per record: accuracy = mean
    of the per-record accuracies, half_width = 1.96 * std(per-record accuracies) / sqrt(n) with n
    records (population std, the same formula). ``ci95`` is accuracy -/+ half_width clipped to
    [0, 1]. ``mean_p_right`` / ``mean_p_wrong`` average the geometric-mean token probabilities
    the same way.
    """

    accuracy: float
    ci95: tuple[float, float]
    half_width: float
    n: int
    mean_p_right: float
    mean_p_wrong: float
    skipped: int = 0

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n, "half_width": self.half_width,
                "mean_p_right": self.mean_p_right, "mean_p_wrong": self.mean_p_wrong, "skipped": self.skipped}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _stats(values: Sequence[float], p_right: Sequence[float], p_wrong: Sequence[float], skipped: int) -> GroupStats:
    n = len(values)
    acc = _mean(values)
    var = _mean([(v - acc) ** 2 for v in values])
    half = Z95 * math.sqrt(var / n)
    return GroupStats(acc, (max(0.0, acc - half), min(1.0, acc + half)), half, n,
                      _mean(p_right), _mean(p_wrong), skipped)


def aggregate(scores: Sequence[RecordScores], *, per_record: bool = False) -> dict[str, GroupStats]:
    """Accuracy per group over ``scores`` (see :class:`GroupStats` for both averaging modes).

    Groups without any scored prompt are left out. Pooled over prompts, a flag's variance is
    p (1 - p), so the interval is the paper's 1.96 * sqrt(p (1 - p) / n).
    """
    out: dict[str, GroupStats] = {}
    for name in GROUPS:
        present = [s.groups[name] for s in scores if name in s.groups]
        skipped = sum(g.skipped for g in present)
        present = [g for g in present if len(g)]
        if not present:
            continue
        if per_record:
            out[name] = _stats([_mean([float(c) for c in g.correct]) for g in present],
                               [_mean(g.p_right) for g in present], [_mean(g.p_wrong) for g in present], skipped)
        else:
            out[name] = _stats([float(c) for g in present for c in g.correct],
                               [p for g in present for p in g.p_right], [p for g in present for p in g.p_wrong],
                               skipped)
    return out


def aggregate_metrics(scores: Sequence[RecordScores], *, per_record: bool = False) -> dict[str, MetricStats]:
    """Mean of each field metric over ``scores`` (pooled over prompts, or per record; see
    :class:`~attention_drift.measure.field_metrics.MetricStats`); metrics no record has are left out."""
    out: dict[str, MetricStats] = {}
    for name, metric in METRICS.items():
        stats = metric_stats(metric, [s.metrics[name].values for s in scores if name in s.metrics],
                             per_record=per_record)
        if stats is not None:
            out[name] = stats
    return out


@dataclass(frozen=True)
class FluencyStats:
    """Mean n-gram entropy (bits; the paper shows it x100) over ``n`` generations, or over ``n``
    records' means when averaged per record."""

    ngram_entropy: float
    n: int

    def to_json(self) -> dict:
        return {"ngram_entropy": self.ngram_entropy, "n": self.n}


def fluency_stats(scores: Sequence[RecordScores], *, per_record: bool = False) -> FluencyStats | None:
    """Pooled (or per-record) mean n-gram entropy of the records that have fluency results."""
    present = [s.fluency for s in scores if s.fluency is not None and s.fluency.ngram_entropy]
    if not present:
        return None
    if per_record:
        return FluencyStats(_mean([f.mean for f in present]), len(present))
    values = [v for f in present for v in f.ngram_entropy]
    return FluencyStats(_mean(values), len(values))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 when any value is 0."""
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def avg_s(stats: dict[str, GroupStats]) -> float | None:
    """The paper's Avg.S: harmonic mean of the ES, PS, NS, RS and DNS accuracies; None unless
    all five groups are present (e.g. RS needs WikiData-type records, NS CounterFact-type)."""
    if not all(name in stats for name in AVG_S_GROUPS):
        return None
    return harmonic_mean([stats[name].accuracy for name in AVG_S_GROUPS])
