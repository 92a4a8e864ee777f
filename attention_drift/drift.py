"""Attention drift: how an edit moves the prediction position's attention, and whether that
predicts specificity failure.

The unit of measurement is the attention row of the *prediction position* (the last prompt
token, which predicts the first target token) of every layer and query head. One batched
forward per model state (before / inside the edit) yields both those rows and the logits that
score the true answer against the edit's new target, so a prompt is never run twice per state.

Typical use, with any editor that is a context manager changing the weights in place::

    drift = measure_drift(model, rewrite, prompts, lambda: edit(model, rewrite), targets=answers)
    drift.head_drift(0, "subject_last").top(5)
    report = dataset_drift(model, records, lambda r: edit(model, r.rewrite))
    report.to_dict()

Everything that is attention *mass on a region* sums the row over that region's key positions;
*delta* is after minus before; *KL* is KL(before || after) of the whole row with eps 1e-8
inside the logs, as in the paper.
"""

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attention_drift import tokens
from attention_drift.data import Record, Rewrite, distract_prompt
from attention_drift.hooks import act_name
from attention_drift.errors import AttentionDriftError

EPS = 1e-8
REGIONS = (
    "subject", "subject_last", "prompt_subject", "prompt_subject_last",
    "edit_sentence", "target_new", "prompt", "last",
)
GROUPS = ("distract_neighborhood", "distract_relation", "neighborhood", "relation")
SEVERITIES = ("logodds_drop", "p_true_drop")
OUTCOMES = (*SEVERITIES, "fails")


class DriftError(AttentionDriftError):
    """Unusable input to a drift measurement; raised before any weight is touched."""


# ---------------------------------------------------------------------------------------------
# Attention rows


@dataclass(frozen=True)
class AttentionRows:
    """Attention rows of one query position per prompt, for every layer and query head.

    ``rows[b, l, h, k]`` is the attention that prompt ``b``'s query position ``query[b]`` pays to
    key ``k`` in layer ``l``, head ``h`` (grouped-query models: one row per query head). Keys are
    right padded to the longest prompt; keys at or beyond ``lengths[b]`` hold zeros.
    """

    rows: Float[Tensor, "batch layer head key"]
    lengths: Int[Tensor, " batch"]
    query: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _rows_from_cache(cache, n_layers: int, query: Tensor, n_keys: int) -> Tensor:
    picks = torch.arange(query.shape[0])
    per_layer = [cache[act_name("pattern", l)][picks, :, query, :n_keys] for l in range(n_layers)]
    return torch.stack(per_layer, dim=1).float()


def _forward_rows(model, batch: tokens.Batch, query: Tensor, rows_of: int) -> tuple[Tensor, Tensor]:
    """(logits, rows) of one forward; rows are read for the first ``rows_of`` batch rows."""
    wanted = {act_name("pattern", l) for l in range(model.cfg.n_layers)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in wanted
        )
    sub = {name: cache[name][:rows_of] for name in wanted}
    n_keys = int(batch.prompt_lengths[:rows_of].max())
    return logits, _rows_from_cache(sub, model.cfg.n_layers, query, n_keys)


def collect_attention_rows(model, prompts: Sequence[str], query: str | Sequence[int] = "last") -> AttentionRows:
    """Attention rows of all layers and heads for a batch of prompts, in ONE batched forward.

    ``query`` is ``"last"`` (each prompt's last token, the prediction position) or one explicit
    token position per prompt (:func:`~attention_drift.tokens.encode` positions, BOS counted).
    Only ``hook_pattern`` is cached.
    """
    prompts = list(prompts)
    batch = tokens.batch_prompts(model, prompts)
    q = _query_positions(batch, query)
    _, rows = _forward_rows(model, batch, q, len(prompts))
    return AttentionRows(rows, batch.prompt_lengths.clone(), q)


def _query_positions(batch: tokens.Batch, query: str | Sequence[int]) -> Tensor:
    if isinstance(query, str):
        if query != "last":
            raise DriftError(f"query must be 'last' or one position per prompt, not {query!r}")
        return batch.last_prompt_index.clone()
    q = torch.as_tensor(list(query), dtype=torch.long)
    if q.shape != batch.prompt_lengths.shape:
        raise DriftError(f"query gives {q.numel()} positions for {len(batch)} prompts; give one per prompt")
    if bool(((q < 0) | (q >= batch.prompt_lengths)).any()):
        raise DriftError(
            f"query positions {q.tolist()} fall outside the prompts (lengths {batch.prompt_lengths.tolist()})"
        )
    return q


# ---------------------------------------------------------------------------------------------
# Regions of a prompt

Span = tuple[int, int]


@dataclass(frozen=True)
class Regions:
    """Token spans (inclusive, :func:`~attention_drift.tokens.encode` positions) of one prompt.

    Args:
        length: number of tokens of the prompt (BOS included).
        subject: the edited subject's tokens: in a distract prompt the occurrence inside the
            edit sentence (the first one), otherwise the prompt's first occurrence; None if absent.
        prompt_subjects: the subject's occurrences in the prompt proper (after the edit sentence
            in a distract prompt, all of them otherwise).
        edit_sentence: the edit sentence ``f"{prompt} {target_new}."`` when the text starts with it.
        target_new: the new target's tokens inside the edit sentence.
    """

    length: int
    subject: Span | None
    prompt_subjects: tuple[Span, ...]
    edit_sentence: Span | None
    target_new: Span | None

    @classmethod
    def of(cls, model, rewrite: Rewrite, text: str) -> "Regions":
        length = len(tokens.encode(model, text))
        spans = tokens.subject_spans(model, text, rewrite.subject)
        edit_sentence = target_new = None
        if text.startswith(rewrite.edit_sentence):
            edit_sentence = tokens.subject_spans(model, text, rewrite.edit_sentence)[0]
            inside = [s for s in tokens.subject_spans(model, text, rewrite.target_new)
                      if edit_sentence[0] <= s[0] and s[1] <= edit_sentence[1]]
            target_new = inside[-1] if inside else None
            subject = spans[0] if spans else None
            prompt_subjects = tuple(s for s in spans if s[0] > edit_sentence[1])
        else:
            subject = spans[0] if spans else None
            prompt_subjects = tuple(spans)
        return cls(length, subject, prompt_subjects, edit_sentence, target_new)

    def positions(self, region: str) -> tuple[int, ...]:
        """Token positions of ``region`` (one of :data:`REGIONS`); empty when the prompt lacks it.

        ``subject_last`` is the edited subject's last token (the paper's strongest factor);
        ``prompt_subject_last`` the last token of each of the prompt's own occurrences;
        ``prompt`` everything after the edit sentence (the whole prompt if there is none);
        ``last`` the prediction position.
        """
        def span(s: Span | None) -> tuple[int, ...]:
            return () if s is None else tuple(range(s[0], s[1] + 1))

        if region == "subject":
            return span(self.subject)
        if region == "subject_last":
            return () if self.subject is None else (self.subject[1],)
        if region == "prompt_subject":
            return tuple(p for s in self.prompt_subjects for p in span(s))
        if region == "prompt_subject_last":
            return tuple(s[1] for s in self.prompt_subjects)
        if region == "edit_sentence":
            return span(self.edit_sentence)
        if region == "target_new":
            return span(self.target_new)
        if region == "prompt":
            start = 0 if self.edit_sentence is None else self.edit_sentence[1] + 1
            return tuple(range(start, self.length))
        if region == "last":
            return (self.length - 1,)
        raise DriftError(f"unknown region {region!r}; choose from {REGIONS}")

    def mask(self, region: str, n_keys: int) -> Bool[Tensor, " key"]:
        mask = torch.zeros(n_keys, dtype=torch.bool)
        mask[list(self.positions(region))] = True
        return mask


# ---------------------------------------------------------------------------------------------
# Scores and per-prompt drift


@dataclass(frozen=True)
class Scores:
    """Scores of prompts under one model state: mean per-token log-probabilities (the paper's
    negated per-token NLL) of the true answer and of the edit's new target.

    ``p_true = exp(lp_true)`` is the geometric-mean token probability; ``logodds = lp_true -
    lp_new``; a prompt is failed (``prefers_new``) when ``lp_new > lp_true`` (strict, as the
    paper's correctness test).
    """

    lp_true: Float[Tensor, " n"]
    lp_new: Float[Tensor, " n"]

    @property
    def p_true(self) -> Float[Tensor, " n"]:
        return self.lp_true.exp()

    @property
    def p_new(self) -> Float[Tensor, " n"]:
        return self.lp_new.exp()

    @property
    def logodds(self) -> Float[Tensor, " n"]:
        return self.lp_true - self.lp_new

    @property
    def prefers_new(self) -> Bool[Tensor, " n"]:
        return self.lp_new > self.lp_true


def row_kl(before: Float[Tensor, "*rows key"], after: Float[Tensor, "*rows key"]) -> Float[Tensor, "*rows"]:
    """KL(before || after) of attention rows: sum_k b_k (log(b_k + 1e-8) - log(a_k + 1e-8))."""
    return (before * ((before + EPS).log() - (after + EPS).log())).sum(-1)


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
        n_heads = self.before.shape[1]
        order = keys[by].flatten().argsort(descending=True, stable=True)[: max(k, 0)]
        out = []
        for i in order.tolist():
            l, h = divmod(i, n_heads)
            out.append((l, h, float(self.before[l, h]), float(self.after[l, h]), float(self.delta[l, h])))
        return out


FACTORS = (
    "max_drift_subject_last", "sum_drift_subject_last",
    "max_drift_subject", "sum_drift_subject",
    "max_drift_prompt_subject_last", "max_drift_edit_sentence", "max_drift_target_new",
    "max_kl", "sum_kl",
)


@dataclass(frozen=True)
class PromptDrift:
    """Attention rows and scores of a batch of prompts before and inside one edit.

    ``scores_before`` / ``scores_after`` are None when no true answers were given.
    """

    prompts: tuple[str, ...]
    regions: tuple[Regions, ...]
    before: AttentionRows
    after: AttentionRows
    scores_before: Scores | None = None
    scores_after: Scores | None = None

    def mass(self, region: str) -> tuple[Float[Tensor, "batch layer head"], Float[Tensor, "batch layer head"]]:
        """(before, after) attention mass on ``region`` per prompt, layer and head; NaN for
        prompts that lack the region."""
        n_keys = self.before.rows.shape[-1]
        masks = torch.stack([r.mask(region, n_keys) for r in self.regions]).float()
        before = torch.einsum("blhk,bk->blh", self.before.rows, masks)
        after = torch.einsum("blhk,bk->blh", self.after.rows, masks)
        absent = torch.tensor([not r.positions(region) for r in self.regions])
        nan = torch.tensor(float("nan"))
        return (torch.where(absent[:, None, None], nan, before),
                torch.where(absent[:, None, None], nan, after))

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


def _score_batch(model, prompts: list[str], true_targets: Sequence[str] | None, new_target: str):
    if true_targets is None:
        return tokens.batch_prompts(model, prompts)
    return tokens.batch_with_targets(model, prompts + prompts, list(true_targets) + [new_target] * len(prompts))


def _state(model, batch: tokens.Batch, n: int, scored: bool) -> tuple[AttentionRows, Scores | None]:
    query = batch.last_prompt_index[:n].clone()
    logits, rows = _forward_rows(model, batch, query, n)
    scores = None
    if scored:
        lp = tokens.target_log_probs(logits, batch)
        scores = Scores(lp[:n].detach().clone(), lp[n:].detach().clone())
    return AttentionRows(rows, batch.prompt_lengths[:n].clone(), query), scores


def measure_drift(
    model,
    rewrite: Rewrite,
    prompts: Sequence[str],
    edit_fn: Callable[[], AbstractContextManager],
    targets: Sequence[str] | None = None,
) -> PromptDrift:
    """Attention rows (and, given ``targets``, scores) of ``prompts`` before and inside an edit.

    ``prompts`` are full texts (e.g. :func:`~attention_drift.data.distract_prompt` outputs);
    ``targets`` their true answers, scored against ``rewrite.target_new``. ``edit_fn()`` must
    return a context manager inside which the model's weights are edited (and restored on exit).
    One batched forward per state gives the rows and the logits of every prompt and both targets
    (prompts followed by their true answer, then by the new target; the rows are read at the
    last prompt token, which does not see the target).
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
    batch = _score_batch(model, prompts, targets, rewrite.target_new)
    before, scores_before = _state(model, batch, len(prompts), targets is not None)
    context = edit_fn()
    if not isinstance(context, AbstractContextManager) and not hasattr(context, "__enter__"):
        raise DriftError(f"edit_fn() returned {type(context).__name__}, not a context manager")
    with context:
        after, scores_after = _state(model, batch, len(prompts), targets is not None)
    return PromptDrift(tuple(prompts), regions, before, after, scores_before, scores_after)


# ---------------------------------------------------------------------------------------------
# Statistics (no scipy)


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient with its Fisher-z confidence interval and two-sided p-value.

    Pearson: r of the pairs, CI ``tanh(atanh(r) -+ z_q / sqrt(n - 3))``. Spearman: Pearson r of
    average ranks, CI with the Fieller-Hartley-Pearson standard error ``sqrt(1.06 / (n - 3))``.
    p-value of both from ``t = r sqrt((n - 2) / (1 - r^2))`` with n - 2 degrees of freedom. Pairs
    with a NaN are dropped first; fewer than 4 pairs, or a constant variable, give NaN.
    """

    method: str
    r: float
    n: int
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("method", "r", "n", "ci_low", "ci_high", "p_value", "confidence")}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def betainc(a: int | float, b: int | float, x: int | float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: int | float, df: int | float) -> float:
    """Two-sided p-value of Student's t: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _clean_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise DriftError(f"correlation needs paired data: got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _correlation(method: str, x: np.ndarray, y: np.ndarray, se_scale: float, confidence: float) -> Correlation:
    n = int(x.size)
    nan = float("nan")
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(method, nan, n, nan, nan, nan, confidence)
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.clip((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))
    zq = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    if abs(r) >= 1.0:
        return Correlation(method, r, n, r, r, 0.0, confidence)
    z, se = math.atanh(r), math.sqrt(se_scale / (n - 3))
    t = r * math.sqrt((n - 2) / (1 - r * r))
    low, high = math.tanh(z - zq * se), math.tanh(z + zq * se)
    return Correlation(method, r, n, low, high, t_two_sided_p(t, n - 2), confidence)


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` predicting boolean ``labels``: the Mann-Whitney U
    statistic over (positives x negatives) pairs, ties counted one half; NaN scores dropped; NaN
    when either class is empty."""
    s, y = _clean_pairs(scores, np.asarray(labels, dtype=np.float64))
    n_pos, n_neg = int((y > 0).sum()), int((y <= 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(s)
    return float((ranks[y > 0].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x, y, confidence: float = 0.95) -> Correlation:
    """Pearson correlation of paired values (see :class:`Correlation` for CI and p-value)."""
    x, y = _clean_pairs(x, y)
    return _correlation("pearson", x, y, 1.0, confidence)


def spearman(x, y, confidence: float = 0.95) -> Correlation:
    """Spearman rank correlation (average ranks for ties; see :class:`Correlation`)."""
    x, y = _clean_pairs(x, y)
    return _correlation("spearman", _ranks(x), _ranks(y), 1.06, confidence)


@dataclass(frozen=True)
class BinnedCurve:
    """Failure by drift-factor quantile bin.

    Bins are the factor's ``n_bins`` quantile intervals (lower edge inclusive for the first bin,
    upper edges inclusive); per bin: count, mean factor, failure rate (fraction of prompts the
    edited model fails) and mean severity. Empty bins (ties) hold NaN.
    """

    factor: str
    severity: str
    edges: tuple[float, ...]
    count: tuple[int, ...]
    mean_factor: tuple[float, ...]
    failure_rate: tuple[float, ...]
    mean_severity: tuple[float, ...]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("factor", "severity", "edges", "count", "mean_factor",
                                              "failure_rate", "mean_severity")}


def binned_curve(factor: Sequence[float | int], fails: Sequence[bool | int], severity: Sequence[float | int],
                 n_bins: int = 5, *, factor_name: str = "", severity_name: str = "") -> BinnedCurve:
    """Failure rate and mean severity per quantile bin of ``factor`` (NaN factors dropped)."""
    if n_bins < 1:
        raise DriftError(f"n_bins must be >= 1, not {n_bins}")
    f = np.asarray(factor, dtype=np.float64)
    fl = np.asarray(fails, dtype=np.float64)
    sv = np.asarray(severity, dtype=np.float64)
    keep = np.isfinite(f)
    f, fl, sv = f[keep], fl[keep], sv[keep]
    if f.size == 0:
        nan = (float("nan"),) * n_bins
        return BinnedCurve(factor_name, severity_name, (float("nan"),) * (n_bins + 1), (0,) * n_bins, nan, nan, nan)
    edges = np.quantile(f, np.linspace(0, 1, n_bins + 1))
    index = np.clip(np.searchsorted(edges, f, side="left") - 1, 0, n_bins - 1)
    count, mean_f, rate, mean_s = [], [], [], []
    for b in range(n_bins):
        sel = index == b
        count.append(int(sel.sum()))
        empty = not sel.any()
        mean_f.append(float("nan") if empty else float(f[sel].mean()))
        rate.append(float("nan") if empty else float(fl[sel].mean()))
        mean_s.append(float("nan") if empty else float(np.nanmean(sv[sel])))
    return BinnedCurve(factor_name, severity_name, tuple(float(e) for e in edges), tuple(count),
                       tuple(mean_f), tuple(rate), tuple(mean_s))


# ---------------------------------------------------------------------------------------------
# Data-set report


@dataclass(frozen=True)
class DriftSample:
    """One scored prompt of a data-set run: its factors, scores before / inside the edit, and failure.

    ``fails``: the edited model prefers the new target (``lp_new > lp_true``); ``flipped``: it
    fails and the unedited model did not. Severities: ``logodds_drop`` = log-odds(true vs new)
    before minus after; ``p_true_drop`` = P(true) before minus after.
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

    @property
    def fails(self) -> bool:
        return self.lp_new_after > self.lp_true_after

    @property
    def flipped(self) -> bool:
        return self.fails and not self.lp_new_before > self.lp_true_before

    @property
    def severity(self) -> dict[str, float]:
        return {
            "logodds_drop": (self.lp_true_before - self.lp_new_before) - (self.lp_true_after - self.lp_new_after),
            "p_true_drop": math.exp(self.lp_true_before) - math.exp(self.lp_true_after),
        }

    def outcome(self, name: str) -> float:
        """A severity of :data:`SEVERITIES`, or ``"fails"`` as 1.0 / 0.0."""
        return float(self.fails) if name == "fails" else self.severity[name]

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id, "group": self.group, "prompt": self.prompt, "target_true": self.target_true,
            "factors": dict(self.factors), "lp_true_before": self.lp_true_before,
            "lp_new_before": self.lp_new_before, "lp_true_after": self.lp_true_after,
            "lp_new_after": self.lp_new_after, "fails": self.fails, "flipped": self.flipped,
            "severity": self.severity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DriftSample":
        """The sample :meth:`to_dict` wrote (derived fields are recomputed)."""
        return cls(d["case_id"], d["group"], d["prompt"], d["target_true"], dict(d["factors"]),
                   d["lp_true_before"], d["lp_new_before"], d["lp_true_after"], d["lp_new_after"])


@dataclass(frozen=True)
class HeadStats:
    """Per-head statistics over prompts of one per-head quantity ([layer, head] each).

    ``mean`` and ``quantiles`` (at ``levels``) ignore NaN prompts; ``frac_above`` is the fraction
    of prompts whose value exceeds ``threshold``.
    """

    name: str
    mean: Float[Tensor, "layer head"]
    quantiles: Float[Tensor, "level layer head"]
    levels: tuple[float, ...]
    frac_above: Float[Tensor, "layer head"]
    threshold: float

    @classmethod
    def of(cls, name: str, values: Float[Tensor, "n layer head"], levels: tuple[float, ...],
           threshold: float) -> "HeadStats":
        valid = ~values.isnan()
        count = valid.sum(0).clamp(min=1)
        mean = torch.where(valid, values, 0.0).sum(0) / count
        quantiles = torch.nanquantile(values, torch.tensor(levels, dtype=values.dtype), dim=0)
        frac = ((values > threshold) & valid).sum(0) / count
        return cls(name, mean, quantiles, tuple(levels), frac.to(values.dtype), threshold)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean, as (layer, head, mean)."""
        n_heads = self.mean.shape[1]
        order = torch.nan_to_num(self.mean, nan=-math.inf).flatten().argsort(descending=True, stable=True)[:k]
        return [(*divmod(i, n_heads), float(self.mean.flatten()[i])) for i in order.tolist()]

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": self.mean.tolist(), "levels": list(self.levels),
                "quantiles": self.quantiles.tolist(), "threshold": self.threshold,
                "frac_above": self.frac_above.tolist(), "top": [list(t) for t in self.top()]}


@dataclass(frozen=True)
class DriftReport:
    """Drift of every head over a data set and its link to specificity failure.

    Args:
        samples: one per scored prompt, in record order.
        head_stats: per-head statistics of the drift to the edited subject's last token
            (``"delta_subject_last"``), to all its tokens (``"delta_subject"``) and of the row KL
            (``"kl"``), over all samples.
        correlations: ``{group or "all": {factor: {outcome: {"pearson": C, "spearman": C}}}}``
            for the outcomes of :data:`OUTCOMES` (``"fails"`` as 0 / 1: point-biserial r).
        auroc: ``{group or "all": {factor: AUROC of the factor predicting failure}}``.
        curves: failure by quantile bin of each factor, over all samples.
    """

    samples: tuple[DriftSample, ...]
    head_stats: dict[str, HeadStats]
    correlations: dict[str, dict[str, dict[str, dict[str, Correlation]]]]
    auroc: dict[str, dict[str, float]]
    curves: dict[str, BinnedCurve]
    groups: tuple[str, ...] = field(default=())

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads whose attention to the edited subject's last token grows most on
        average, as (layer, head, mean drift)."""
        return self.head_stats["delta_subject_last"].top(k)

    def failure_rate(self, group: str | None = None) -> float:
        chosen = [s for s in self.samples if group is None or s.group == group]
        return float("nan") if not chosen else sum(s.fails for s in chosen) / len(chosen)

    def to_dict(self) -> dict:
        """Everything as JSON-ready Python values (NaN stays float NaN)."""
        return {
            "groups": list(self.groups),
            "n_samples": len(self.samples),
            "failure_rate": {g: self.failure_rate(None if g == "all" else g) for g in ("all", *self.groups)},
            "samples": [s.to_dict() for s in self.samples],
            "head_stats": {k: v.to_dict() for k, v in self.head_stats.items()},
            "correlations": {
                g: {f: {s: {m: c.to_dict() for m, c in by_m.items()} for s, by_m in by_s.items()}
                    for f, by_s in by_f.items()}
                for g, by_f in self.correlations.items()
            },
            "auroc": self.auroc,
            "curves": {k: v.to_dict() for k, v in self.curves.items()},
        }


def _group_prompts(record: Record, group: str) -> tuple[list[str], list[str]]:
    source = record.neighborhood if group.endswith("neighborhood") else record.relation
    prompts = list(source.prompts)
    if group.startswith("distract_"):
        prompts = [distract_prompt(record.rewrite, p) for p in prompts]
    return prompts, list(source.targets)


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


def dataset_drift(
    model,
    records: Iterable[Record],
    edit_fn_factory: Callable[[Record], AbstractContextManager],
    groups: Sequence[str] = ("distract_neighborhood", "distract_relation"),
    *,
    threshold: float = 0.05,
    levels: tuple[float, ...] = (0.1, 0.5, 0.9),
    n_bins: int = 5,
    progress: bool = False,
) -> DriftReport:
    """Drift of every head on each record's prompts of ``groups``, and its link to failure.

    ``edit_fn_factory(record)`` returns the context manager that applies the record's edit (e.g.
    ``lambda r: edit(model, r.rewrite, method="rome")``); each record is edited once and all its
    prompts are measured in one batched forward per state (:func:`measure_drift`). Prompts that do
    not contain the edited subject (plain neighbourhood prompts) are skipped: drift is measured
    on the subject's tokens. ``threshold`` is the drift (attention mass change) above which a
    head counts in ``frac_above``; ``levels`` the per-head quantiles; ``n_bins`` the bins of the
    failure curves.
    """
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise DriftError(f"unknown groups {bad}; choose from {GROUPS}")
    records = list(records)
    plans = []
    for record in records:
        prompts, targets, names = record_prompts(record, groups)
        if prompts:
            plans.append((record, prompts, targets, names))
    if not plans:
        raise DriftError(f"no record has prompts containing its subject in groups {tuple(groups)}")
    if progress:
        from tqdm.auto import tqdm

        plans = tqdm(plans, desc="drift")
    samples, deltas, subject_deltas, kls = [], [], [], []
    for record, prompts, targets, names in plans:
        drift = measure_drift(model, record.rewrite, prompts, lambda r=record: edit_fn_factory(r), targets)
        factors = drift.factors()
        before, after = drift.mass("subject_last")
        deltas.append(after - before)
        before, after = drift.mass("subject")
        subject_deltas.append(after - before)
        kls.append(drift.kl())
        sb, sa = drift.scores_before, drift.scores_after
        for i, (prompt, target, group) in enumerate(zip(prompts, targets, names)):
            samples.append(DriftSample(
                record.case_id, group, prompt, target, {k: float(v[i]) for k, v in factors.items()},
                float(sb.lp_true[i]), float(sb.lp_new[i]), float(sa.lp_true[i]), float(sa.lp_new[i]),
            ))
    return drift_report(samples, torch.cat(deltas), torch.cat(subject_deltas), torch.cat(kls), groups,
                        threshold=threshold, levels=levels, n_bins=n_bins)


def drift_report(
    samples: Sequence[DriftSample],
    deltas: Float[Tensor, "n layer head"],
    subject_deltas: Float[Tensor, "n layer head"],
    kls: Float[Tensor, "n layer head"],
    groups: Sequence[str] = ("distract_neighborhood", "distract_relation"),
    *,
    threshold: float = 0.05,
    levels: tuple[float, ...] = (0.1, 0.5, 0.9),
    n_bins: int = 5,
) -> DriftReport:
    """The :class:`DriftReport` of already measured samples (what :func:`dataset_drift` ends
    with; also used to rebuild a report from stored per-record results). ``deltas``,
    ``subject_deltas`` and ``kls`` hold one [layer, head] slice per sample, in sample order:
    the drift to the edited subject's last token, to all its tokens, and the row KL."""
    samples = list(samples)
    if not samples:
        raise DriftError("drift_report needs at least one sample")
    if not deltas.shape[0] == subject_deltas.shape[0] == kls.shape[0] == len(samples):
        raise DriftError(f"got {len(samples)} samples but per-head values for "
                         f"{deltas.shape[0]}/{subject_deltas.shape[0]}/{kls.shape[0]} prompts")
    head_stats = {
        "delta_subject_last": HeadStats.of("delta_subject_last", deltas, levels, threshold),
        "delta_subject": HeadStats.of("delta_subject", subject_deltas, levels, threshold),
        "kl": HeadStats.of("kl", kls, levels, threshold),
    }
    correlations, aurocs = {}, {}
    for group in ("all", *groups):
        chosen = [s for s in samples if group == "all" or s.group == group]
        correlations[group] = {
            f: {o: {"pearson": pearson([s.factors[f] for s in chosen], [s.outcome(o) for s in chosen]),
                    "spearman": spearman([s.factors[f] for s in chosen], [s.outcome(o) for s in chosen])}
                for o in OUTCOMES}
            for f in FACTORS
        }
        aurocs[group] = {f: auroc([s.factors[f] for s in chosen], [s.fails for s in chosen]) for f in FACTORS}
    curves = {
        f: binned_curve([s.factors[f] for s in samples], [s.fails for s in samples],
                        [s.severity["logodds_drop"] for s in samples], n_bins,
                        factor_name=f, severity_name="logodds_drop")
        for f in FACTORS
    }
    return DriftReport(tuple(samples), head_stats, correlations, aurocs, curves, tuple(groups))
