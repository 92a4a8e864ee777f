"""The paper's case study: one edit, one distract prompt, and the attention that explains the failure.

After an edit (e.g. ROME: "The Eiffel Tower is located in" -> "New York"), a *distract prompt*
that states the edited fact before asking about another subject ("The Eiffel Tower is located
in New York. The Louvre is located in") is answered with the new target. :func:`case_study`
records, for that one prompt:

* the prediction (top-1 token, P(true), P(new), log-odds) before the edit, inside it, and inside
  it with the attention pattern of every layer and head restored to its pre-edit value
  (:func:`~attention_drift.patching.run_patched` with one ``pattern`` patch over all layers);
* the attention row of the prediction position (the last prompt token) of every layer and
  head before and inside the edit (:func:`~attention_drift.drift.collect_attention_rows`);
* the heads whose attention to the edited subject's last token grew most
  (:meth:`~attention_drift.drift.HeadDrift.top`).

The edit is entered once and the weights are restored on exit. :func:`case_study_figure`
(plotly) and :func:`case_study_view` (circuitsvis, offline) draw the top heads' rows before vs
after; :meth:`CaseStudy.to_json` gives the numbers file of the figure.

Typical use::

    rw = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "New York", "Paris")
    cs = case_study(model, rw, distract_prompt(rw, "The Louvre is located in"), "Paris")
    cs.post.p_new, cs.restored.p_new
    case_study_figure(cs).show()
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import plotly.graph_objects as go
import torch
from circuitsvis.attention import attention_heads
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from attention_drift import tokens
from attention_drift.data import Rewrite
from attention_drift.drift import HeadDrift, collect_attention_rows, row_kl
from attention_drift.editing.api import METHODS, edit
from attention_drift.editing.config import EditConfig
from attention_drift.patching import (
    Patch,
    PatchCase,
    record_activations,
    run_patched,
    run_variant,
    supports_pattern_patching,
)
from attention_drift.plots import PALETTE, SEQUENTIAL, _label, _style
from attention_drift.regions import Regions
from attention_drift.viz import AttentionView
from attention_drift.errors import AttentionDriftError

STATES = ("pre", "post", "restored")
_STATE_NAMES = {"pre": "pre-edit", "post": "post-edit", "restored": "post-edit, attention restored"}


class CaseStudyError(AttentionDriftError):
    """Unusable input to a case study; raised before any weight is touched."""


@dataclass(frozen=True)
class Prediction:
    """What one model state predicts after the prompt.

    ``top_token`` / ``top_prob``: the most likely next token and its probability;
    ``p_true`` / ``p_new``: geometric-mean per-token probability of the true answer / the new
    target (the plain probability for single-token targets); ``logodds = log p_true - log p_new``
    (positive: the true answer wins).
    """

    top_token: str
    top_prob: float
    p_true: float
    p_new: float
    logodds: float

    @property
    def prefers_new(self) -> bool:
        return self.logodds < 0

    def to_json(self) -> dict:
        return {"top_token": self.top_token, "top_prob": self.top_prob, "p_true": self.p_true,
                "p_new": self.p_new, "logodds": self.logodds, "prefers_new": self.prefers_new}


class HeadChange(NamedTuple):
    """Attention of one head's prediction row to the edited subject's last token."""

    layer: int
    head: int
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class CaseStudy:
    """One edit, one distract prompt: predictions of three model states and attention rows.

    Args:
        request: the edit.
        prompt: the distract prompt (starts with the edit sentence).
        true_target: the answer the unedited model should give.
        new_target: the edit's new target (``request.target_new``).
        tokens: the prompt's token strings (:func:`~attention_drift.tokens.encode` positions).
        subject_last: position of the edited subject's last token (in the edit sentence).
        pre, post, restored: predictions before the edit, inside it, and inside it with every
            layer's and head's attention pattern (all query positions) restored to pre-edit.
        rows_before, rows_after: attention row of the prediction position (last prompt token),
            ``[layer, head, key]``, before and inside the edit.
        top_heads: the heads whose attention to ``subject_last`` increased most, largest first.
        method: the editor's name (``"custom"`` for an ``edit_fn``).
    """

    request: Rewrite
    prompt: str
    true_target: str
    new_target: str
    tokens: tuple[str, ...]
    subject_last: int
    pre: Prediction
    post: Prediction
    restored: Prediction
    rows_before: Float[Tensor, "layer head key"]
    rows_after: Float[Tensor, "layer head key"]
    top_heads: tuple[HeadChange, ...]
    method: str = "rome"

    @property
    def predictions(self) -> dict[str, Prediction]:
        return {"pre": self.pre, "post": self.post, "restored": self.restored}

    @property
    def drift(self) -> Float[Tensor, "layer head"]:
        """Change (after - before) of every head's attention to the subject's last token."""
        return self.rows_after[..., self.subject_last] - self.rows_before[..., self.subject_last]

    @property
    def kl(self) -> Float[Tensor, "layer head"]:
        """KL(before || after) of every head's prediction row."""
        return row_kl(self.rows_before, self.rows_after)

    def to_json(self) -> dict:
        """Everything as plain JSON values (lists, floats, strings); :meth:`from_json` reads it back."""
        r = self.request
        return {
            "request": {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                        "target_true": r.target_true, "relation_id": r.relation_id,
                        "target_new_id": r.target_new_id},
            "method": self.method,
            "prompt": self.prompt,
            "true_target": self.true_target,
            "new_target": self.new_target,
            "tokens": list(self.tokens),
            "subject_last": self.subject_last,
            "predictions": {k: v.to_json() for k, v in self.predictions.items()},
            "top_heads": [{"layer": h.layer, "head": h.head, "before": h.before, "after": h.after,
                           "delta": h.delta} for h in self.top_heads],
            "rows_before": self.rows_before.tolist(),
            "rows_after": self.rows_after.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "CaseStudy":
        """The case study :meth:`to_json` wrote."""
        def prediction(p: dict) -> Prediction:
            return Prediction(p["top_token"], p["top_prob"], p["p_true"], p["p_new"], p["logodds"])

        return cls(
            Rewrite(**d["request"]), d["prompt"], d["true_target"], d["new_target"], tuple(d["tokens"]),
            int(d["subject_last"]), *(prediction(d["predictions"][s]) for s in STATES),
            torch.tensor(d["rows_before"], dtype=torch.float32, device="cpu"),
            torch.tensor(d["rows_after"], dtype=torch.float32, device="cpu"),
            tuple(HeadChange(int(h["layer"]), int(h["head"]), float(h["before"]), float(h["after"]))
                  for h in d["top_heads"]),
            d.get("method", "rome"),
        )


# ---------------------------------------------------------------------------------------------
# Running the case study


def _check_input(model, request: Rewrite, prompt: str, true_target: str, top_k: int) -> Regions:
    if not isinstance(request, Rewrite):
        raise CaseStudyError(f"request must be an attention_drift.Rewrite, not {type(request).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CaseStudyError("the distract prompt is empty; build one with "
                             "attention_drift.distract_prompt(request, 'The Louvre is located in')")
    if not isinstance(top_k, int) or top_k < 1:
        raise CaseStudyError(f"top_k must be an int >= 1, not {top_k!r}")
    if not true_target.strip():
        raise CaseStudyError("true_target is empty; give the answer the unedited model should keep")
    if true_target.strip() == request.target_new.strip():
        raise CaseStudyError(f"true_target {true_target!r} is the edit's new target; nothing to tell apart")
    try:
        regions = Regions.of(model, request, prompt)
    except ValueError as err:  # empty subject
        raise CaseStudyError(str(err)) from err
    if regions.subject is None:
        raise CaseStudyError(f"the edited subject {request.subject!r} does not occur in the prompt {prompt!r}; "
                             "the case study measures attention to its tokens")
    if regions.edit_sentence is None:
        raise CaseStudyError(
            f"the prompt {prompt!r} does not start with the edit sentence {request.edit_sentence!r}; "
            f"build it with attention_drift.distract_prompt(request, prompt)")
    if not prompt[len(request.edit_sentence):].strip():
        raise CaseStudyError(f"the prompt {prompt!r} is only the edit sentence; add the question after it, "
                             "e.g. distract_prompt(request, 'The Louvre is located in')")
    if not supports_pattern_patching(model):
        raise CaseStudyError(
            f"attention patterns cannot be restored on this {model.original_model.config.model_type!r} model: "
            "TransformerLens discards edits to hook_pattern there (GPT-J, GPT-Neo, OPT)")
    return regions


def _prediction(model, logits: Tensor, query: int, lp_true: Tensor, lp_new: Tensor) -> Prediction:
    probs = logits[0, query].float().softmax(-1)
    top = int(probs.argmax())
    lt, ln = float(lp_true), float(lp_new)
    return Prediction(model.tokenizer.decode([top]), float(probs[top]), math.exp(lt), math.exp(ln), lt - ln)


def case_study(
    model,
    request: Rewrite,
    distract_prompt: str,
    true_target: str,
    *,
    method: str = "rome",
    config: EditConfig | None = None,
    edit_fn: Callable[[], AbstractContextManager] | None = None,
    top_k: int = 6,
) -> CaseStudy:
    """Run the case study of ``request`` on ``distract_prompt`` (see the module docstring).

    The edit is ``attention_drift.edit(model, request, method=method, config=config)`` unless
    ``edit_fn`` is given: a callable returning a context manager inside which the model is
    edited (restored on exit). It is entered once. ``true_target`` is scored against
    ``request.target_new``. ``top_k`` heads (at most all of them) are kept by increase of the
    prediction row's attention to the edited subject's last token. All input is checked before
    the edit; the model's weights are the same afterwards.
    """
    regions = _check_input(model, request, distract_prompt, true_target, top_k)
    if edit_fn is None:
        if method not in METHODS:
            raise CaseStudyError(f"unknown method {method!r}; choose from {METHODS}")
        name = method

        def edit_fn():
            return edit(model, request, method=method, config=config)
    else:
        if not callable(edit_fn):
            raise CaseStudyError("edit_fn must be a callable returning a context manager, e.g. "
                                 "lambda: edit(model, request)")
        name = "custom"
    n_layers = model.cfg.n_layers
    restore = (Patch("pattern", tuple(range(n_layers))),)
    case = PatchCase(distract_prompt, true_target, request.target_new, request)
    ids = tokens.encode(model, distract_prompt)
    query = len(ids) - 1

    source = record_activations(model, case, [restore])  # pre-edit patterns and scores
    pre_logits, _ = run_variant(model, source, ())
    before = collect_attention_rows(model, [distract_prompt]).rows[0]
    context = edit_fn()
    if not hasattr(context, "__enter__") or not hasattr(context, "__exit__"):
        raise CaseStudyError(f"edit_fn() returned {type(context).__name__}, not a context manager")
    with context:
        result = run_patched(model, source, [restore])
        post_logits, _ = run_variant(model, source, ())
        restored_logits, _ = run_variant(model, source, restore)
        after = collect_attention_rows(model, [distract_prompt]).rows[0]

    pre = _prediction(model, pre_logits, query, source.scores.lp_true[0], source.scores.lp_new[0])
    post = _prediction(model, post_logits, query, result.base.lp_true[0], result.base.lp_new[0])
    restored = _prediction(model, restored_logits, query, result.patched.lp_true[0], result.patched.lp_new[0])
    s = regions.subject[1]
    drift = HeadDrift(before[..., s], after[..., s], row_kl(before, after))
    top = tuple(HeadChange(l, h, b, a) for l, h, b, a, _ in drift.top(top_k, "delta"))
    return CaseStudy(request, distract_prompt, true_target, request.target_new,
                     tuple(tokens.token_strings(model, ids)), s, pre, post, restored,
                     before.cpu(), after.cpu(), top, name)


# ---------------------------------------------------------------------------------------------
# Figures


def _probabilities(cs: CaseStudy, sep: str = "<br>") -> str:
    return sep.join(
        f"{_STATE_NAMES[k]}: P({cs.true_target.strip()}) = {p.p_true:.3f}, "
        f"P({cs.new_target.strip()}) = {p.p_new:.3f}, top-1 {p.top_token!r}"
        for k, p in cs.predictions.items()
    )


def _top_rows(cs: CaseStudy) -> tuple[Tensor, Tensor, list[str]]:
    if not cs.top_heads:
        raise CaseStudyError("the case study has no top heads to draw")
    layers = [h.layer for h in cs.top_heads]
    heads = [h.head for h in cs.top_heads]
    return cs.rows_before[layers, heads], cs.rows_after[layers, heads], [h.label for h in cs.top_heads]


def case_study_figure(cs: CaseStudy, *, title: str | None = None) -> go.Figure:
    """Two heatmaps, before and after the edit: the top heads' (rows) attention from the
    prediction position over the prompt's tokens (columns), on one colour scale.

    The edited subject's last token is outlined; the annotation gives P(true) / P(new) and the
    top-1 token of the pre-edit, post-edit and attention-restored states. Hover shows the head,
    token, position and both values.
    """
    before, after, labels = _top_rows(cs)
    before, after = before.detach().double().cpu(), after.detach().double().cpu()
    k, n = before.shape
    ticks = [_label(t) for t in cs.tokens]
    zmax = max(float(before.max()), float(after.max()), 1e-6)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("before the edit", "after the edit"))
    for col, (name, z, other) in enumerate((("before", before, after), ("after", after, before)), start=1):
        custom = [[[labels[i], ticks[j], j, float(other[i, j])] for j in range(n)] for i in range(k)]
        other_name = "after" if name == "before" else "before"
        fig.add_trace(go.Heatmap(
            z=z.tolist(), x=list(range(n)), y=list(range(k)), name=name, customdata=custom,
            coloraxis="coloraxis",
            hovertemplate=("head %{customdata[0]}<br>token %{customdata[1]} (position %{customdata[2]})"
                           f"<br>{name}: %{{z:.4f}}<br>{other_name}: %{{customdata[3]:.4f}}<extra></extra>"),
        ), row=1, col=col)
        fig.add_shape(type="rect", x0=cs.subject_last - 0.5, x1=cs.subject_last + 0.5, y0=-0.5, y1=k - 0.5,
                      line={"color": PALETTE[1], "width": 2}, row=1, col=col)
        fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=ticks, tickangle=-60,
                         title_text="key token", row=1, col=col)
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(k)), ticktext=labels)
    fig.update_layout(coloraxis={"colorscale": SEQUENTIAL, "cmin": 0.0, "cmax": zmax,
                                 "colorbar": {"title": "attention"}},
                      height=max(480, 40 * k + 380))
    title = title or (f"Case study: {cs.request.subject} → {cs.new_target.strip()} ({cs.method}), "
                      f"top {k} drifting heads")
    fig = _style(fig, title, "key token", "head")
    fig.update_layout(margin={"t": 190})
    fig.add_annotation(text=_probabilities(cs), xref="paper", yref="paper", x=0.0, y=1.08,
                       showarrow=False, xanchor="left", yanchor="bottom", align="left", font={"size": 12})
    return fig


def _view_patterns(rows: Tensor, n: int) -> Tensor:
    """[head, key] prediction rows as [head, q, k] patterns whose only non-zero row is the last."""
    patterns = torch.zeros(rows.shape[0], n, n, device="cpu")
    patterns[:, n - 1] = rows.detach().float().cpu()
    return patterns


def case_study_view(cs: CaseStudy) -> AttentionView:
    """circuitsvis panels of the top heads' prediction rows before and after the edit, side by side.

    circuitsvis draws [head, query, key] patterns: here only the last query row (the
    prediction position) is filled, so hover the last token. Both panels share the range [0, 1];
    the view inlines circuitsvis's JavaScript and works offline.
    """
    before, after, labels = _top_rows(cs)
    n = len(cs.tokens)
    panels = tuple(
        (f"{label} the edit ({_STATE_NAMES[state]}: P({cs.true_target.strip()}) = {cs.predictions[state].p_true:.3f}, "
         f"P({cs.new_target.strip()}) = {cs.predictions[state].p_new:.3f})",
         attention_heads(_view_patterns(rows, n), list(cs.tokens), attention_head_names=labels,
                         min_value=0.0, max_value=1.0))
        for label, state, rows in (("before", "pre", before), ("after", "post", after))
    )
    title = (f"Case study: {cs.request.subject} → {cs.new_target.strip()}; prediction row of the top "
             f"{len(labels)} heads (restored: P({cs.true_target.strip()}) = {cs.restored.p_true:.3f}, "
             f"P({cs.new_target.strip()}) = {cs.restored.p_new:.3f})")
    return AttentionView(title, panels, side_by_side=True)


__all__ = ["CaseStudy", "CaseStudyError", "HeadChange", "Prediction", "case_study", "case_study_figure",
           "case_study_view"]
