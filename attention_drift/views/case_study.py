"""The case study drawn: the top heads' prediction rows before vs after the edit, as plotly
heatmaps (:func:`case_study_figure`) and offline circuitsvis panels (:func:`case_study_view`)."""

import plotly.graph_objects as go
import torch
from circuitsvis.attention import attention_heads
from plotly.subplots import make_subplots
from torch import Tensor

from attention_drift.measure.case_study import STATE_NAMES, CaseStudy, CaseStudyError
from attention_drift.views.plots import PALETTE, SEQUENTIAL, token_label, style
from attention_drift.views.viz import AttentionView


def _probabilities(cs: CaseStudy, sep: str = "<br>") -> str:
    return sep.join(
        f"{STATE_NAMES[k]}: P({cs.true_target.strip()}) = {p.p_true:.3f}, "
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
    ticks = [token_label(t) for t in cs.tokens]
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
    fig = style(fig, title, "key token", "head")
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
        (f"{label} the edit ({STATE_NAMES[state]}: P({cs.true_target.strip()}) = {cs.predictions[state].p_true:.3f}, "
         f"P({cs.new_target.strip()}) = {cs.predictions[state].p_new:.3f})",
         attention_heads(_view_patterns(rows, n), list(cs.tokens), attention_head_names=labels,
                         min_value=0.0, max_value=1.0))
        for label, state, rows in (("before", "pre", before), ("after", "post", after))
    )
    title = (f"Case study: {cs.request.subject} → {cs.new_target.strip()}; prediction row of the top "
             f"{len(labels)} heads (restored: P({cs.true_target.strip()}) = {cs.restored.p_true:.3f}, "
             f"P({cs.new_target.strip()}) = {cs.restored.p_new:.3f})")
    return AttentionView(title, panels, side_by_side=True)


__all__ = ["case_study_figure", "case_study_view"]
