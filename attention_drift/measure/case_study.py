"""The paper's case study: one edit, one distract prompt, and the attention that explains the failure.

After an edit (e.g. ROME: "The Eiffel Tower is located in" -> "New York"), a *distract prompt*
that states the edited fact before asking about another subject ("The Eiffel Tower is located
in New York. The Louvre is located in") is answered with the new target. :func:`case_study`
records, for that one prompt:

* the prediction (top-1 token, P(true), P(new), log-odds) before the edit, inside it, and inside
  it with the attention pattern of every layer and head restored to its pre-edit value
  (:func:`~attention_drift.measure.patching.run_patched` with one ``pattern`` patch over all layers);
* the attention row of the prediction position (the last prompt token) of every layer and
  head before and inside the edit (:func:`~attention_drift.measure.drift.collect_attention_rows`);
* the heads whose attention to the edited subject's last token grew most
  (:meth:`~attention_drift.measure.drift.HeadDrift.top`).

The edit is entered once and the weights are restored on exit. :func:`~attention_drift.views.case_study.case_study_figure`
(plotly: the three states' predictions and the top heads' rows before vs after) and
:func:`~attention_drift.views.case_study.case_study_view` (circuitsvis, offline: the rows) draw it;
:meth:`CaseStudy.to_json` gives the numbers file of the figure.

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

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.measure.drift import HeadDrift, collect_attention_rows, row_kl
from attention_drift.editing.api import METHODS, edit
from attention_drift.editing.config import EditConfig
from attention_drift.measure.patching import (
    Patch,
    PatchCase,
    record_activations,
    run_patched,
    run_variant,
    supports_pattern_patching,
)
from attention_drift.core.regions import Regions
from attention_drift.core.errors import AttentionDriftError

STATES = ("pre", "post", "restored")
STATE_NAMES = {"pre": "pre-edit", "post": "post-edit", "restored": "post-edit, attention restored"}


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
        tokens: the prompt's token strings (:func:`~attention_drift.core.tokens.encode` positions).
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


__all__ = ["CaseStudy", "CaseStudyError", "HeadChange", "Prediction", "case_study"]
