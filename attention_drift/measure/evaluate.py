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

import copy
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.scores import check_batch_size, score_pairs
from attention_drift.core.data import Record
from attention_drift.core.models import on_model_device
from attention_drift.measure import field_metrics
from attention_drift.measure.field_metrics import METRICS, MetricScores, MetricStats, metric_stats
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
class FluencyConfig:
    """How fluency generations are sampled (defaults: the paper's / ROME's setting).

    Args:
        per_prompt: generations per generation prompt (CounterFact records have 10 prompts,
            so 1 gives the paper's 10 generations per record).
        max_prompts: use at most this many of the record's generation prompts (None: all).
        max_length: tokens per generation, prompt included (BOS included where the model uses it).
        top_k: sample from the k most likely tokens at each step (no temperature, no top-p).
        seed: torch seed for sampling; the same for every record so pre/post runs are paired.
        batch_size: generations sampled together.
    """

    per_prompt: int = 1
    max_prompts: int | None = None
    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        for name in ("per_prompt", "max_length", "top_k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FluencyConfig.{name} must be a positive integer, got {value!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"FluencyConfig.max_prompts must be None or >= 1, got {self.max_prompts!r}")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("per_prompt", "max_prompts", "max_length", "top_k", "seed")}


@dataclass(frozen=True)
class FluencyScores:
    """Generated texts (prompt included) and the n-gram entropy (bits) of each."""

    texts: tuple[str, ...]
    ngram_entropy: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.ngram_entropy) / len(self.ngram_entropy) if self.ngram_entropy else math.nan

    def to_json(self) -> dict:
        return {"ngram_entropy": list(self.ngram_entropy), "texts": list(self.texts)}

    @classmethod
    def from_json(cls, obj: dict) -> "FluencyScores":
        return cls(tuple(obj.get("texts", ())), tuple(float(x) for x in obj["ngram_entropy"]))


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
    _check_groups(groups)
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
    _check_groups(groups)
    with on_model_device(model):
        return _evaluate_records(model, records, batch_size, pre, metrics, groups)


def _check_groups(groups: Sequence[str] | None) -> None:
    if groups is not None and (not groups or set(groups) - set(GROUPS)):
        raise ValueError(f"groups {list(groups)}: choose one or more of {', '.join(GROUPS)}")


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


# --- fluency -------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    """Words and single punctuation marks, approximating ``nltk.word_tokenize`` without nltk
    (they differ on contractions, quotes and runs of punctuation)."""
    return _WORD.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's ``compute_n_gram_entropy`` (the paper's fluency, FL, before the x100).

    For each n, the Shannon entropy in bits of the frequency distribution of the text's word
    n-grams; the result is the arithmetic mean of ``weight_n * H_n`` (defaults: 2- and
    3-grams weighted 2/3 and 4/3, i.e. H2/3 + 2*H3/3). A text with no n-grams of some n
    contributes 0 for that n, as in ROME.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"ns and weights must be non-empty and of equal length, got {ns} and {weights}")
    words = _words(text)
    terms = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


def _generation_model(model):
    """A plain Hugging Face model that shares every parameter and buffer with the bridge.

    The bridge's own key-value cache gives wrong continuations after the first generated token
    (checked on SmolLM2 with transformer-lens 4.3), so sampling runs on this clone, built on the
    meta device and filled with the bridge's tensors (no copy): it sees the current, possibly
    edited weights, but not hooks attached to the bridge.
    """
    from transformers import AutoModelForCausalLM

    source = model.original_model
    with torch.device("meta"):
        clone = AutoModelForCausalLM.from_config(copy.deepcopy(source.config))
    tensors: dict[str, Tensor] = {}
    named = list(source.named_parameters(remove_duplicate=False)) + list(source.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        tensors.setdefault(name.replace("._original_component", ""), tensor)
    for name, _ in list(clone.named_parameters(remove_duplicate=False)) + list(clone.named_buffers(remove_duplicate=False)):
        if name not in tensors:
            raise RuntimeError(f"cannot map {name!r} of the Hugging Face model onto the bridge's tensors")
        owner, _, leaf = name.rpartition(".")
        module = clone.get_submodule(owner)
        slot = module._parameters if leaf in module._parameters else module._buffers
        slot[leaf] = tensors[name]
    return clone.eval()


@torch.no_grad()
def _generate_ids(model, prompts: Sequence[str], config: FluencyConfig) -> list[list[int]]:
    """Token ids of the sampled texts, prompt included, each ``config.max_length`` long."""
    rows = [tokens.encode(model, p) for p in prompts for _ in range(config.per_prompt)]
    if not rows:
        return []
    tokenizer = model.tokenizer
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    clone = _generation_model(model)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start : start + config.batch_size]
            width = max(len(r) for r in chunk)
            new = config.max_length - min(len(r) for r in chunk)
            if new <= 0:
                out += [r[: config.max_length] for r in chunk]
                continue
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            generated = clone.generate(
                ids, attention_mask=mask, do_sample=True, top_k=config.top_k, top_p=1.0, temperature=1.0,
                repetition_penalty=1.0, max_new_tokens=new, eos_token_id=None, pad_token_id=pad,
            )
            out += [g[width - len(r) :][: config.max_length].tolist() for r, g in zip(chunk, generated)]
    return out


def generate_texts(model, prompts: Sequence[str], config: FluencyConfig = FluencyConfig()) -> list[str]:
    """Sample ``config.per_prompt`` texts per prompt with top-k sampling, as ROME's fluency test.

    Each text is ``config.max_length`` tokens long, prompt included (generation never stops at
    EOS, like ROME's ``generate_fast``), decoded without special tokens. Seeded with
    ``config.seed`` without touching the global random state. Texts of one prompt are
    consecutive.
    """
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in _generate_ids(model, prompts, config)]


@torch.no_grad()
def perplexity(model, texts: Sequence[str], *, batch_size: int = 8) -> float:
    """Perplexity of ``texts``: exp of the mean negative log-likelihood over all predicted tokens
    of all texts pooled (every token after the first of each text, BOS where the model uses it)."""
    check_batch_size(batch_size)
    if not texts:
        raise ValueError("perplexity needs at least one text")
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokens.batch_prompts(model, list(texts[start : start + batch_size]))
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        log_probs = logits[:, :-1].float().log_softmax(-1)
        token_lp = log_probs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        valid = batch.attention_mask[:, 1:].bool()
        total -= float(token_lp[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("texts are too short: perplexity needs at least one text of two or more tokens")
    return math.exp(total / count)


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
