"""Attention drift: how an edit moves the prediction position's attention, and whether that
predicts specificity failure.

The unit of measurement is the attention row of the *prediction position* (the last prompt
token, which predicts the first target token) of every layer and query head. One batched
forward per model state (before / inside the edit) yields both those rows and the logits that
score the true answer against the edit's new target, so a prompt is never run twice per state.

Three levels, each built on the one before:

* :func:`measure_drift`: any prompts of one rewrite, before and inside one edit
  (:class:`PromptDrift`: rows, regions, scores, factors; tensors on the model's device);
* :func:`drift_record`: one data-set record, edited once, on its distract prompts
  (:class:`RecordDrift`, on the CPU: the line of the ``attention-drift drift`` run file, with
  :meth:`RecordDrift.to_line` / :meth:`RecordDrift.from_line`, and optionally the full attention
  patterns of chosen heads, :class:`HeadCapture`);
* the report over records is :func:`attention_drift.reports.drift.drift_report` (the reports
  layer); :func:`attention_drift.runs.analysis.dataset_drift` is the loop of :func:`drift_record`
  and the report in memory, :func:`attention_drift.runs.analysis.run_drift` the same two
  functions through a resumable run file.

Typical use, with any editor that is a context manager changing the weights in place::

    drift = measure_drift(model, rewrite, prompts, lambda: edit(model, rewrite), targets=answers)
    drift.head_drift(0, "subject_last").top(5)
    report = dataset_drift(model, records, lambda r: edit(model, r.rewrite))
    report.to_dict()

Everything that is attention *mass on a region* sums the row over that region's key positions
(:class:`~attention_drift.core.regions.Regions`); *delta* is after minus before; *KL* is
KL(before || after) of the whole row with eps 1e-8 inside the logs, as in the paper.
"""

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Record, Rewrite, distract_prompt
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import act_name
from attention_drift.editing.sadr import selection_frequency
from attention_drift.core.regions import Regions
from attention_drift.core.scores import Scores

EPS = 1e-8
GROUPS = ("distract_neighborhood", "distract_relation", "neighborhood", "relation")
DEFAULT_GROUPS = ("distract_neighborhood", "distract_relation")
SEVERITIES = ("logodds_drop", "p_true_drop")
OUTCOMES = (*SEVERITIES, "fails")
"""Outcomes of the all-prompt statistics (``"fails"``: wrong after the edit, see :class:`Outcome`)."""
FAILURE_OUTCOMES = (*SEVERITIES, "failure")
"""Outcomes of the statistics over prompts right before the edit (``"failure"``, see :class:`Outcome`)."""
DEFINITIONS = {
    "right_before": "the unedited model scores the true answer at least as high as the new target "
                    "(lp_true >= lp_new, mean per-token log-probabilities)",
    "failure": "a prompt right before the edit that the edited model gets wrong (lp_new > lp_true); prompts "
               "wrong before the edit are excluded from every failure statistic (the *_right_before keys)",
    "wrong_after": "the edited model prefers the new target (lp_new > lp_true), whatever the unedited model did; "
                   "the all-prompt keys failure_rate, correlations, auroc, curves and headline use it as 'fails'",
}
"""What ``drift.json``'s failure keys mean (written into it as ``"definitions"``)."""
HEAD_KEYS = ("subject_last_before", "subject_last_after", "delta_subject", "kl")
"""Per-head arrays of a run-file line (``line["heads"]``), each ``[prompt][layer][head]``."""
DIGITS = 6
"""Decimal digits kept of per-head values in :class:`RecordDrift` (and so in the run file)."""
CAPTURE_DIGITS = 4
"""Decimal digits of captured attention patterns in :meth:`HeadCapture.to_json`."""

EditFactory = Callable[[Record], AbstractContextManager]


class DriftError(AttentionDriftError):
    """Unusable input to a drift measurement; raised before any weight is touched."""


def rounded(t: Tensor, digits: int = DIGITS) -> Tensor:
    """A float64 CPU copy of ``t`` rounded to ``digits`` decimals: how run files store tensors, so
    a result and its line read back hold the same numbers."""
    scale = 10.0 ** digits
    return (t.detach().to("cpu", torch.float64) * scale).round() / scale


# ---------------------------------------------------------------------------------------------
# Attention rows


@dataclass(frozen=True)
class AttentionRows:
    """Attention rows of one query position per prompt, for every layer and query head.

    ``rows[b, l, h, k]`` is the attention that prompt ``b``'s query position ``query[b]`` pays to
    key ``k`` in layer ``l``, head ``h`` (grouped-query models: one row per query head). Keys are
    right padded to the longest prompt; keys at or beyond ``lengths[b]`` hold zeros. All three
    tensors are on the model's device.
    """

    rows: Float[Tensor, "batch layer head key"]
    lengths: Int[Tensor, " batch"]
    query: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _pattern_names(model) -> list[str]:
    return [act_name("pattern", l) for l in range(model.cfg.n_layers)]


def _forward_rows(model, batch: tokens.Batch, query: Tensor, rows_of: int,
                  patterns: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logits, rows, patterns) of one forward. Rows (``[b, layer, head, key]``) are read at
    ``query`` for the first ``rows_of`` batch rows; with ``patterns`` also their full patterns
    ``[b, layer, head, query, key]`` (float16), cropped to the longest of those prompts."""
    names = _pattern_names(model)
    wanted = set(names)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in wanted
        )
    n_keys = int(batch.prompt_lengths[:rows_of].max())
    picks = torch.arange(rows_of, device=query.device)
    rows = torch.stack([cache[n][picks, :, query, :n_keys] for n in names], dim=1).float()
    full = None
    if patterns:
        full = torch.stack([cache[n][:rows_of, :, :n_keys, :n_keys] for n in names], dim=1).half()
    return logits, rows, full


def collect_attention_rows(model, prompts: Sequence[str], query: str | Sequence[int] = "last") -> AttentionRows:
    """Attention rows of all layers and heads for a batch of prompts, in ONE batched forward.

    ``query`` is ``"last"`` (each prompt's last token, the prediction position) or one explicit
    token position per prompt (:func:`~attention_drift.core.tokens.encode` positions, BOS counted).
    Only ``hook_pattern`` is cached.
    """
    prompts = list(prompts)
    batch = tokens.batch_prompts(model, prompts)
    q = _query_positions(batch, query)
    _, rows, _ = _forward_rows(model, batch, q, len(prompts))
    return AttentionRows(rows, batch.prompt_lengths.clone(), q)


def _query_positions(batch: tokens.Batch, query: str | Sequence[int]) -> Tensor:
    if isinstance(query, str):
        if query != "last":
            raise DriftError(f"query must be 'last' or one position per prompt, not {query!r}")
        return batch.last_prompt_index.clone()
    q = torch.as_tensor(list(query), dtype=torch.long, device=batch.prompt_lengths.device)
    if q.shape != batch.prompt_lengths.shape:
        raise DriftError(f"query gives {q.numel()} positions for {len(batch)} prompts; give one per prompt")
    if bool(((q < 0) | (q >= batch.prompt_lengths)).any()):
        raise DriftError(
            f"query positions {q.tolist()} fall outside the prompts (lengths {batch.prompt_lengths.tolist()})"
        )
    return q


# ---------------------------------------------------------------------------------------------
# Per-prompt drift


def row_kl(before: Float[Tensor, "*rows key"], after: Float[Tensor, "*rows key"]) -> Float[Tensor, "*rows"]:
    """KL(before || after) of attention rows: sum_k b_k (log(b_k + 1e-8) - log(a_k + 1e-8))."""
    return (before * ((before + EPS).log() - (after + EPS).log())).sum(-1)


def ranked_heads(values: Float[Tensor, "layer head"], k: int | None = None) -> list[tuple[int, int, float]]:
    """``(layer, head, value)`` of the ``k`` (default: all) heads with the largest ``values``,
    largest first; NaN last; ties in (layer, head) order."""
    n_heads = values.shape[1]
    flat = torch.nan_to_num(values.detach().flatten(), nan=-math.inf)
    order = flat.argsort(descending=True, stable=True)[: flat.numel() if k is None else max(k, 0)]
    out = values.detach().flatten()
    return [(*divmod(int(i), n_heads), float(out[i])) for i in order.tolist()]


@dataclass(frozen=True)
class HeadDrift:
    """Drift of every head for one prompt and one region of its keys.

    ``before`` / ``after``: attention mass the prediction position puts on the region (sum of the
    row over the region's keys) before / inside the edit; ``delta = after - before``; ``kl`` is
    KL(before || after) of the whole rows (eps 1e-8), independent of the region.
    """

    before: Float[Tensor, "layer head"]
    after: Float[Tensor, "layer head"]
    kl: Float[Tensor, "layer head"]

    @property
    def delta(self) -> Float[Tensor, "layer head"]:
        return self.after - self.before

    def top(self, k: int = 10, by: str = "delta") -> list[tuple[int, int, float, float, float]]:
        """The ``k`` heads with the largest ``by`` (``"delta"``, ``"abs_delta"`` or ``"kl"``), as
        ``(layer, head, before, after, delta)``, largest first."""
        keys = {"delta": self.delta, "abs_delta": self.delta.abs(), "kl": self.kl}
        if by not in keys:
            raise DriftError(f"top(by={by!r}): choose from {tuple(keys)}")
        return [(l, h, float(self.before[l, h]), float(self.after[l, h]), float(self.delta[l, h]))
                for l, h, _ in ranked_heads(keys[by], k)]


FACTORS = (
    "max_drift_subject_last", "sum_drift_subject_last",
    "max_drift_subject", "sum_drift_subject",
    "max_drift_prompt_subject_last", "max_drift_edit_sentence", "max_drift_target_new",
    "max_kl", "sum_kl",
)


@dataclass(frozen=True)
class PromptDrift:
    """Attention rows and scores of a batch of prompts before and inside one edit (tensors on
    the model's device).

    ``scores_before`` / ``scores_after`` are None when no true answers were given;
    ``patterns_before`` / ``patterns_after`` (float16 ``[prompt, layer, head, query, key]``,
    keys and queries up to the longest prompt) only when :func:`measure_drift` captured them;
    ``true_top1_before``: whether the unedited model's top-1 next token at the prediction
    position is the true answer's first token (None without true answers).
    """

    prompts: tuple[str, ...]
    regions: tuple[Regions, ...]
    before: AttentionRows
    after: AttentionRows
    scores_before: Scores | None = None
    scores_after: Scores | None = None
    patterns_before: Float[Tensor, "batch layer head query key"] | None = None
    patterns_after: Float[Tensor, "batch layer head query key"] | None = None
    true_top1_before: Bool[Tensor, " batch"] | None = None

    def mass(self, region: str) -> tuple[Float[Tensor, "batch layer head"], Float[Tensor, "batch layer head"]]:
        """(before, after) attention mass on ``region`` per prompt, layer and head; NaN for
        prompts that lack the region."""
        rows = self.before.rows
        masks = torch.stack([r.mask(region, rows.shape[-1], rows.device) for r in self.regions]).to(rows.dtype)
        before = torch.einsum("blhk,bk->blh", rows, masks)
        after = torch.einsum("blhk,bk->blh", self.after.rows, masks)
        absent = torch.tensor([not r.positions(region) for r in self.regions], device=rows.device)[:, None, None]
        return before.masked_fill(absent, math.nan), after.masked_fill(absent, math.nan)

    def kl(self) -> Float[Tensor, "batch layer head"]:
        """KL(before || after) of each prompt's whole attention row per layer and head."""
        return row_kl(self.before.rows, self.after.rows)

    def head_drift(self, index: int, region: str = "subject_last") -> HeadDrift:
        """The [layer, head] drift of prompt ``index`` on ``region``."""
        if not self.regions[index].positions(region):
            raise DriftError(f"prompt {self.prompts[index]!r} has no {region!r} region")
        before, after = self.mass(region)
        return HeadDrift(before[index], after[index], self.kl()[index])

    def factors(self) -> dict[str, Float[Tensor, " batch"]]:
        """Per-prompt drift factors (:data:`FACTORS`); NaN where the prompt lacks the region.

        ``max_drift_R`` / ``sum_drift_R``: max / sum over all layers and heads of the change
        (after - before) of the attention mass from the prediction position to region R
        (``subject_last`` = the edited subject's last token, the paper's strongest factor);
        ``max_kl`` / ``sum_kl``: max / sum over layers and heads of KL(before || after) of the rows.
        """
        out = {}
        for region in ("subject_last", "subject", "prompt_subject_last", "edit_sentence", "target_new"):
            before, after = self.mass(region)
            delta = (after - before).flatten(1)
            out[f"max_drift_{region}"] = delta.max(-1).values
            if region in ("subject_last", "subject"):
                out[f"sum_drift_{region}"] = delta.sum(-1)
        kl = self.kl().flatten(1)
        out["max_kl"] = kl.max(-1).values
        out["sum_kl"] = kl.sum(-1)
        return {name: out[name] for name in FACTORS}


def _state(model, batch: tokens.Batch, n: int, scored: bool, patterns: bool):
    query = batch.last_prompt_index[:n].clone()
    logits, rows, full = _forward_rows(model, batch, query, n, patterns)
    scores = top1 = None
    if scored:
        lp = tokens.target_log_probs(logits, batch)
        scores = Scores(lp[:n].detach().clone(), lp[n:].detach().clone())
        picks = torch.arange(n, device=query.device)
        first_true = batch.input_ids[picks, batch.prompt_lengths[:n]]
        top1 = logits[picks, query].argmax(-1) == first_true
    return AttentionRows(rows, batch.prompt_lengths[:n].clone(), query), scores, full, top1


def measure_drift(
    model,
    rewrite: Rewrite,
    prompts: Sequence[str],
    edit_fn: Callable[[], AbstractContextManager],
    targets: Sequence[str] | None = None,
    *,
    capture: bool = False,
) -> PromptDrift:
    """Attention rows (and, given ``targets``, scores) of ``prompts`` before and inside an edit.

    ``prompts`` are full texts (e.g. :func:`~attention_drift.core.data.distract_prompt` outputs);
    ``targets`` their true answers, scored against ``rewrite.target_new``. ``edit_fn()`` must
    return a context manager inside which the model's weights are edited (and restored on exit).
    One batched forward per state gives the rows and the logits of every prompt and both targets
    (prompts followed by their true answer, then by the new target; the rows are read at the
    last prompt token, which does not see the target). ``capture`` also keeps every head's full
    attention pattern of each prompt from the same two passes (float16). The unedited pass also
    tells whether the true answer's first token is the top-1 prediction (``true_top1_before``).
    """
    prompts = list(prompts)
    if not prompts:
        raise DriftError("measure_drift needs at least one prompt")
    if targets is not None and len(targets) != len(prompts):
        raise DriftError(f"got {len(targets)} targets for {len(prompts)} prompts; give one true answer per prompt")
    if not callable(edit_fn):
        raise DriftError("edit_fn must be a callable returning a context manager, e.g. lambda: edit(model, rewrite)")
    regions = tuple(Regions.of(model, rewrite, p) for p in prompts)
    lacking = [p for p, r in zip(prompts, regions) if r.subject is None]
    if lacking:
        raise DriftError(
            f"subject {rewrite.subject!r} does not occur in {lacking[:3]}; drift is measured on the "
            "edited subject's tokens, so prompts must contain it (use data.distract_prompt)"
        )
    scored = targets is not None
    if scored:
        batch = tokens.batch_with_targets(model, prompts + prompts,
                                          list(targets) + [rewrite.target_new] * len(prompts))
    else:
        batch = tokens.batch_prompts(model, prompts)
    before, scores_before, patterns_before, top1_before = _state(model, batch, len(prompts), scored, capture)
    context = edit_fn()
    if not isinstance(context, AbstractContextManager) and not hasattr(context, "__enter__"):
        raise DriftError(f"edit_fn() returned {type(context).__name__}, not a context manager")
    with context:
        after, scores_after, patterns_after, _ = _state(model, batch, len(prompts), scored, capture)
    return PromptDrift(tuple(prompts), regions, before, after, scores_before, scores_after,
                       patterns_before, patterns_after, top1_before)


# ---------------------------------------------------------------------------------------------
# One record


class Outcome:
    """Correctness of a prompt scored before and inside an edit (its ``lp_true_before``,
    ``lp_new_before``, ``lp_true_after``, ``lp_new_after``): the one definition of failure.

    A prompt is right when the true answer scores at least as high as the new target (wrong:
    ``lp_new > lp_true``, the paper's strict test). *Failure* (:attr:`flipped`) is defined on
    the prompts :attr:`right_before` the edit only: a prompt the unedited model already got
    wrong cannot be failed by the edit, so it is excluded from failure statistics rather than
    counted (:data:`DEFINITIONS`).
    """

    @property
    def right_before(self) -> bool:
        """The unedited model got it right (``lp_true >= lp_new``)."""
        return not self.lp_new_before > self.lp_true_before

    @property
    def fails(self) -> bool:
        """The edited model gets it wrong (``lp_new > lp_true``), whatever the unedited model did."""
        return self.lp_new_after > self.lp_true_after

    @property
    def flipped(self) -> bool:
        """Failure: right before the edit, wrong inside it."""
        return self.fails and self.right_before


@dataclass(frozen=True)
class DriftSample(Outcome):
    """One scored prompt of a data-set run: its factors, scores before / inside the edit, and failure.

    ``fails``: the edited model prefers the new target (``lp_new > lp_true``); ``right_before``:
    the unedited model did not; ``flipped`` (failure): both (:class:`Outcome`). Severities:
    ``logodds_drop`` = log-odds(true vs new) before minus after; ``p_true_drop`` = P(true)
    before minus after. ``true_top1_before``: the true answer's first token was the unedited
    model's top-1 prediction (None in run files written before it was recorded).
    """

    case_id: int | str
    group: str
    prompt: str
    target_true: str
    factors: dict[str, float]
    lp_true_before: float
    lp_new_before: float
    lp_true_after: float
    lp_new_after: float
    true_top1_before: bool | None = None

    @property
    def severity(self) -> dict[str, float]:
        return {
            "logodds_drop": (self.lp_true_before - self.lp_new_before) - (self.lp_true_after - self.lp_new_after),
            "p_true_drop": math.exp(self.lp_true_before) - math.exp(self.lp_true_after),
        }

    def outcome(self, name: str) -> float:
        """A severity of :data:`SEVERITIES`, ``"fails"`` as 1.0 / 0.0, or ``"failure"`` as 1.0 /
        0.0 on prompts right before the edit and NaN on the others (excluded)."""
        if name == "fails":
            return float(self.fails)
        if name == "failure":
            return float(self.flipped) if self.right_before else math.nan
        return self.severity[name]

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id, "group": self.group, "prompt": self.prompt, "target_true": self.target_true,
            "factors": dict(self.factors), "lp_true_before": self.lp_true_before,
            "lp_new_before": self.lp_new_before, "lp_true_after": self.lp_true_after,
            "lp_new_after": self.lp_new_after, "fails": self.fails, "flipped": self.flipped,
            "right_before": self.right_before, "true_top1_before": self.true_top1_before,
            "severity": self.severity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DriftSample":
        """The sample :meth:`to_dict` wrote (derived fields are recomputed)."""
        return cls(d["case_id"], d["group"], d["prompt"], d["target_true"], dict(d["factors"]),
                   d["lp_true_before"], d["lp_new_before"], d["lp_true_after"], d["lp_new_after"],
                   d.get("true_top1_before"))


@dataclass(frozen=True)
class HeadCapture:
    """Full attention patterns of chosen heads on each prompt of a record, before and inside the
    edit, taken from the measurement's own forward passes (CPU, float16).

    Args:
        heads: the (layer, head) pairs, in the order of the patterns' head axis.
        prompts: the prompts, as in :attr:`RecordDrift.samples`.
        tokens: per prompt, its token strings (:func:`~attention_drift.core.tokens.encode` positions).
        before, after: per prompt a ``[head, query, key]`` tensor over the prompt's own tokens
            (``pattern[i, q, k]``: attention of query ``q`` to key ``k`` in head ``heads[i]``).
    """

    heads: tuple[tuple[int, int], ...]
    prompts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    before: tuple[Tensor, ...]
    after: tuple[Tensor, ...]

    def pattern(self, prompt: int, layer: int, head: int, state: str = "after") -> Float[Tensor, "query key"]:
        """The ``[query, key]`` pattern of head (``layer``, ``head``) on prompt ``prompt`` in
        ``state`` (``"before"`` or ``"after"`` the edit)."""
        if state not in ("before", "after"):
            raise DriftError(f"state must be 'before' or 'after', not {state!r}")
        if (layer, head) not in self.heads:
            raise DriftError(f"head ({layer}, {head}) was not captured; captured: {list(self.heads)}")
        return getattr(self, state)[prompt][self.heads.index((layer, head))]

    def select(self, heads: Sequence[tuple[int, int]]) -> "HeadCapture":
        """The same capture restricted to ``heads`` (each must have been captured), in that order."""
        missing = [tuple(h) for h in heads if tuple(h) not in self.heads]
        if missing:
            raise DriftError(f"heads {missing} were not captured; captured: {list(self.heads)}")
        index = [self.heads.index(tuple(h)) for h in heads]
        return HeadCapture(tuple((int(l), int(h)) for l, h in heads), self.prompts, self.tokens,
                           tuple(p[index] for p in self.before), tuple(p[index] for p in self.after))

    def to_json(self, digits: int = CAPTURE_DIGITS) -> dict:
        """Plain JSON values, patterns rounded to ``digits`` decimals (``[prompt][head][q][k]``)."""
        return {"heads": [list(h) for h in self.heads], "prompts": list(self.prompts),
                "tokens": [list(t) for t in self.tokens],
                "before": [rounded(p, digits).tolist() for p in self.before],
                "after": [rounded(p, digits).tolist() for p in self.after]}

    @classmethod
    def from_json(cls, d: dict) -> "HeadCapture":
        """The capture :meth:`to_json` wrote."""
        return cls(tuple((int(l), int(h)) for l, h in d["heads"]), tuple(d["prompts"]),
                   tuple(tuple(t) for t in d["tokens"]),
                   tuple(torch.tensor(p, dtype=torch.float16, device="cpu") for p in d["before"]),
                   tuple(torch.tensor(p, dtype=torch.float16, device="cpu") for p in d["after"]))


@dataclass(frozen=True)
class RecordDrift:
    """One record's drift: its scored prompts and every head's attention before / inside the edit.

    Per-head tensors are ``[prompt, layer, head]`` float64 on the CPU, rounded to :data:`DIGITS`
    decimals (as the run file stores them, so a line read back gives the same numbers).

    Args:
        case_id, kind, subject, target_new: the record.
        samples: one :class:`DriftSample` per prompt, in prompt order.
        subject_last_before, subject_last_after: attention mass of the prediction position on
            the edited subject's last token before / inside the edit.
        delta_subject: change of the mass on all of the subject's tokens.
        kl: KL(before || after) of the prediction rows.
        edit_seconds: the editor's own time (its result's ``seconds``, else the time to enter it).
        capture: full patterns of chosen heads (:func:`drift_record`'s ``capture_heads``).
        sadr_selected: with a SADR edit, per head the fraction of steps x prompts SADR selected
            it (:func:`attention_drift.editing.sadr.selection_frequency`).
    """

    case_id: int | str
    kind: str
    subject: str
    target_new: str
    samples: tuple[DriftSample, ...]
    subject_last_before: Float[Tensor, "prompt layer head"]
    subject_last_after: Float[Tensor, "prompt layer head"]
    delta_subject: Float[Tensor, "prompt layer head"]
    kl: Float[Tensor, "prompt layer head"]
    edit_seconds: float = math.nan
    capture: HeadCapture | None = None
    sadr_selected: Float[Tensor, "layer head"] | None = None

    @property
    def delta_subject_last(self) -> Float[Tensor, "prompt layer head"]:
        return self.subject_last_after - self.subject_last_before

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """``(layer, head, mean drift)`` of the ``k`` heads whose attention to the edited
        subject's last token grew most on average over this record's prompts."""
        return ranked_heads(self.delta_subject_last.nanmean(0), k)

    def to_line(self, *, capture: bool = False) -> dict:
        """The run-file line (JSON values); with ``capture`` also ``"capture"``
        (:meth:`HeadCapture.to_json`) when there is one."""
        line = {
            "case_id": self.case_id, "kind": self.kind, "subject": self.subject, "target_new": self.target_new,
            "samples": [s.to_dict() for s in self.samples],
            "heads": {k: getattr(self, k).tolist() for k in HEAD_KEYS},
            "edit_seconds": self.edit_seconds,
        }
        if self.sadr_selected is not None:
            line["sadr_selected"] = rounded(self.sadr_selected, 4).tolist()
        if capture and self.capture is not None:
            line["capture"] = self.capture.to_json()
        return line

    @classmethod
    def from_line(cls, line: dict) -> "RecordDrift":
        """The record a run-file line holds (a line with samples; see :meth:`to_line`)."""
        if not line.get("samples"):
            raise DriftError(f"the line of case {line.get('case_id')!r} has no samples (a skipped record)")
        heads = {k: torch.tensor(line["heads"][k], dtype=torch.float64, device="cpu") for k in HEAD_KEYS}
        capture = HeadCapture.from_json(line["capture"]) if "capture" in line else None
        return cls(line["case_id"], line.get("kind", ""), line.get("subject", ""), line.get("target_new", ""),
                   tuple(DriftSample.from_dict(s) for s in line["samples"]), **heads,
                   edit_seconds=float(line.get("edit_seconds", math.nan)), capture=capture,
                   sadr_selected=(None if line.get("sadr_selected") is None
                                  else torch.tensor(line["sadr_selected"], dtype=torch.float64, device="cpu")))


def _group_prompts(record: Record, group: str) -> tuple[list[str], list[str]]:
    source = record.neighborhood if group.endswith("neighborhood") else record.relation
    prompts = list(source.prompts)
    if group.startswith("distract_"):
        prompts = [distract_prompt(record.rewrite, p) for p in prompts]
    return prompts, list(source.targets)


def check_groups(groups: Sequence[str]) -> None:
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise DriftError(f"unknown groups {bad}; choose from {GROUPS}")


def record_prompts(record: Record, groups: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(prompts, true targets, group names) of ``record``'s ``groups`` that contain its subject."""
    prompts, targets, names = [], [], []
    for group in groups:
        p, t = _group_prompts(record, group)
        keep = [i for i, text in enumerate(p) if record.rewrite.subject in text]
        prompts += [p[i] for i in keep]
        targets += [t[i] for i in keep]
        names += [group] * len(keep)
    return prompts, targets, names


def _capture(model, drift: PromptDrift, heads: Sequence[tuple[int, int]]) -> HeadCapture:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    bad = [(l, h) for l, h in heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise DriftError(f"capture heads {bad} out of range: the model has {n_layers} layers x {n_heads} heads")
    layers = torch.tensor([l for l, _ in heads], device=drift.patterns_before.device)
    picks = torch.tensor([h for _, h in heads], device=drift.patterns_before.device)
    before, after, strings = [], [], []
    for i, prompt in enumerate(drift.prompts):
        n = drift.regions[i].length
        before.append(drift.patterns_before[i, layers, picks, :n, :n].cpu())
        after.append(drift.patterns_after[i, layers, picks, :n, :n].cpu())
        strings.append(tuple(tokens.token_strings(model, tokens.encode(model, prompt))))
    return HeadCapture(tuple((int(l), int(h)) for l, h in heads), drift.prompts, tuple(strings),
                       tuple(before), tuple(after))


def drift_record(
    model,
    record: Record,
    edit_fn_factory: EditFactory,
    groups: Sequence[str] = DEFAULT_GROUPS,
    *,
    capture_heads: Sequence[tuple[int, int]] | int | str | None = None,
) -> RecordDrift | None:
    """Drift of one record: its prompts of ``groups`` that contain its subject, measured before
    and inside ``edit_fn_factory(record)`` (entered once; :func:`measure_drift`). None, without
    editing, when the record has no such prompt (plain neighbourhood prompts never do).

    ``capture_heads`` also returns the full attention patterns of the distract prompts before
    and inside the edit (:attr:`RecordDrift.capture`), from the same forward passes: a list of
    (layer, head) pairs, an int k (this record's k most drifting heads, :meth:`RecordDrift.top_heads`)
    or ``"all"`` (every head).
    """
    check_groups(groups)
    if isinstance(capture_heads, str) and capture_heads != "all":
        raise DriftError(f"capture_heads must be (layer, head) pairs, an int or 'all', not {capture_heads!r}")
    prompts, targets, names = record_prompts(record, groups)
    if not prompts:
        return None
    entered = {}

    @contextlib.contextmanager
    def edited():
        start = time.perf_counter()
        with edit_fn_factory(record) as result:
            entered["edit"] = float(getattr(result, "seconds", time.perf_counter() - start))
            entered["sadr"] = [r for r in getattr(result, "sadr_records", None) or [] if r.get("mask")]
            yield result

    drift = measure_drift(model, record.rewrite, prompts, edited, targets, capture=capture_heads is not None)
    factors = {k: v.tolist() for k, v in drift.factors().items()}
    sb, sa = drift.scores_before.cpu(), drift.scores_after.cpu()
    top1 = drift.true_top1_before.tolist()
    samples = tuple(
        DriftSample(record.case_id, group, prompt, target, {k: v[i] for k, v in factors.items()},
                    float(sb.lp_true[i]), float(sb.lp_new[i]), float(sa.lp_true[i]), float(sa.lp_new[i]),
                    bool(top1[i]))
        for i, (prompt, target, group) in enumerate(zip(prompts, targets, names))
    )
    before, after = drift.mass("subject_last")
    subject_before, subject_after = drift.mass("subject")
    result = RecordDrift(record.case_id, record.kind, record.rewrite.subject, record.rewrite.target_new, samples,
                         rounded(before), rounded(after), rounded(subject_after - subject_before), rounded(drift.kl()),
                         entered.get("edit", math.nan),
                         sadr_selected=(selection_frequency(entered["sadr"], model.cfg.n_layers, model.cfg.n_heads)
                                        if entered.get("sadr") else None))
    if capture_heads is None:
        return result
    if capture_heads == "all":
        heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    elif isinstance(capture_heads, int):
        heads = [(l, h) for l, h, _ in result.top_heads(capture_heads)]
    else:
        heads = [(int(l), int(h)) for l, h in capture_heads]
    return dataclasses.replace(result, capture=_capture(model, drift, heads))
