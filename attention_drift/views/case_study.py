"""The case study drawn: the three states' predictions (pre-edit, post-edit, attention restored)
and the top heads' prediction rows before vs after the edit, as one plotly figure
(:func:`case_study_figure`), and offline circuitsvis panels of the rows (:func:`case_study_view`)."""

import textwrap

import plotly.graph_objects as go
import torch
from circuitsvis.attention import attention_heads
from plotly.subplots import make_subplots
from torch import Tensor

from attention_drift.measure.case_study import STATE_NAMES, CaseStudy, CaseStudyError
from attention_drift.views.plots import PALETTE, SEQUENTIAL, token_label, style
from attention_drift.views.viz import AttentionView


STATE_LABELS = {"pre": "pre-edit", "post": "post-edit", "restored": "attention restored"}
"""Short names of the three states on the figure's prediction panel."""
WIDTH = 900
"""Figure width in px; titles wrap at :data:`TITLE_CHARS` (about 8 px a character in the title font)."""
TITLE_CHARS = 95


def _state_tick(state: str, cs: CaseStudy) -> str:
    p = cs.predictions[state]
    return f"{STATE_LABELS[state]}<br>top-1 {token_label(repr(p.top_token))} ({p.top_prob:.3f})"


def _top_rows(cs: CaseStudy) -> tuple[Tensor, Tensor, list[str]]:
    if not cs.top_heads:
        raise CaseStudyError("the case study has no top heads to draw")
    layers = [h.layer for h in cs.top_heads]
    heads = [h.head for h in cs.top_heads]
    return cs.rows_before[layers, heads], cs.rows_after[layers, heads], [h.label for h in cs.top_heads]


def case_study_figure(cs: CaseStudy, *, title: str | None = None) -> go.Figure:
    """The three states and the attention that separates them.

    Top: P(true) and P(new) of the pre-edit, post-edit and attention-restored states (bars,
    values on them), each state's top-1 token and its probability under its name. Bottom: two
    heatmaps of the top heads' (rows) attention from the prediction position over the prompt's
    tokens (columns), before and after the edit, on one colour scale; the attention-restored
    state's rows are the before rows (every pattern is restored). The edited subject's last token
    is outlined. Hover shows the head, token, position and both values. The title wraps at
    :data:`TITLE_CHARS` characters.
    """
    before, after, labels = _top_rows(cs)
    before, after = before.detach().double().cpu(), after.detach().double().cpu()
    k, n = before.shape
    ticks = [token_label(t) for t in cs.tokens]
    zmax = max(float(before.max()), float(after.max()), 1e-6)
    fig = make_subplots(rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]], row_heights=[0.32, 0.68],
                        horizontal_spacing=0.04, vertical_spacing=0.2, subplot_titles=(
                            "predictions of the three states", "before the edit (= attention restored)",
                            "after the edit"))
    states = list(cs.predictions)
    x = [_state_tick(s, cs) for s in states]
    for i, (name, attr) in enumerate(((cs.true_target.strip(), "p_true"), (cs.new_target.strip(), "p_new"))):
        values = [getattr(cs.predictions[s], attr) for s in states]
        fig.add_trace(go.Bar(x=x, y=values, name=f"P({name})", marker_color=PALETTE[2 * i],
                             text=[f"{v:.3f}" for v in values], textposition="outside",
                             hovertemplate=f"%{{x}}<br>P({name}) = %{{y:.4f}}<extra></extra>"), row=1, col=1)
    top = max(max(p.p_true, p.p_new) for p in cs.predictions.values())
    fig.update_yaxes(range=[0, 1.25 * max(top, 1e-6)], row=1, col=1)
    for col, (name, z, other) in enumerate((("before", before, after), ("after", after, before)), start=1):
        custom = [[[labels[i], ticks[j], j, float(other[i, j])] for j in range(n)] for i in range(k)]
        other_name = "after" if name == "before" else "before"
        fig.add_trace(go.Heatmap(
            z=z.tolist(), x=list(range(n)), y=list(range(k)), name=name, customdata=custom,
            coloraxis="coloraxis",
            hovertemplate=("head %{customdata[0]}<br>token %{customdata[1]} (position %{customdata[2]})"
                           f"<br>{name}: %{{z:.4f}}<br>{other_name}: %{{customdata[3]:.4f}}<extra></extra>"),
        ), row=2, col=col)
        fig.add_shape(type="rect", x0=cs.subject_last - 0.5, x1=cs.subject_last + 0.5, y0=-0.5, y1=k - 0.5,
                      line={"color": PALETTE[1], "width": 2}, row=2, col=col)
        fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=ticks, tickangle=-60,
                         title_text="key token", row=2, col=col)
        fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(k)), ticktext=labels,
                         showticklabels=col == 1, title_text="head" if col == 1 else None, row=2, col=col)
    fig.update_yaxes(matches="y2", row=2, col=2)
    fig.update_layout(coloraxis={"colorscale": SEQUENTIAL, "cmin": 0.0, "cmax": zmax,
                                 "colorbar": {"title": "attention", "len": 0.6, "y": 0.3}},
                      height=max(760, 40 * k + 620), width=WIDTH, barmode="group",
                      legend={"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.0, "yanchor": "bottom"})
    title = title or (f"Case study: {cs.request.subject} → {cs.new_target.strip()} ({cs.method}), "
                      f"top {k} drifting heads")
    fig = style(fig, "\n".join(textwrap.wrap(title, TITLE_CHARS)), "", "probability")
    fig.update_layout(margin={"t": 100 + 24 * len(textwrap.wrap(title, TITLE_CHARS))})
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


__all__ = ["STATE_LABELS", "case_study_figure", "case_study_view"]
