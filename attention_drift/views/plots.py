"""Plotly figures for drift, patching and evaluation results, and one way to save them.

Every function takes plain tensors, numbers and dicts (not the result classes of
``drift``/``patching``/``evaluate``) and returns a ``plotly.graph_objects.Figure`` styled
the same way (template ``plotly_white``, titled axes, hover text with the exact values).
Heatmaps draw the first row at the top, like a printed matrix, and use numeric axes with
tick labels so that repeated labels (two `` the`` tokens) stay separate rows.

:func:`save` writes HTML that opens offline (plotly.js inlined, or one ``plotly.min.js`` per folder)
and/or PNG; titles are wrapped to the figure's width (:func:`fit_title`).
PNG goes through kaleido >= 1, which drives a Chrome/Chromium binary; on Debian/Ubuntu
``apt-get install chromium`` and ``pip install "kaleido>=1"`` are all it needs (kaleido
finds ``/usr/bin/chromium`` itself; set ``BROWSER_PATH`` for a binary elsewhere).
"""

import html
import importlib.metadata
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch
from jaxtyping import Float
from plotly.colors import qualitative
from torch import Tensor
from attention_drift.core.errors import AttentionDriftError
from attention_drift.reports.stats import pearson, spearman

TEMPLATE = "plotly_white"
DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"
PALETTE = qualitative.Plotly
STATIC_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DRIFT_VALUES = ("delta", "after", "kl")


class PlotError(AttentionDriftError):
    """Input a figure cannot be drawn from; the message says what is wrong."""


class PngExportError(AttentionDriftError, RuntimeError):
    """Static image export is not possible here; the message says what to install."""


def _values(x: Tensor) -> Tensor:
    return x.detach().to("cpu", torch.float64)


TITLE_SIZE = 16
"""Font size (px) of figure titles; the reference line under a title (:func:`add_reference`) is 11 px."""
REFERENCE_SIZE = 11
CHAR_EM = 0.5
"""Estimated width of one title character in units of its font size (8 px at 16 px; Arial text
averages ~0.45), used to wrap titles to the figure's width."""
LINE_HEIGHT = 1.3
"""plotly's spacing of title lines, in units of the title's font size (every line, small ones too)."""
TITLE_PAD, TITLE_GAP = 12, 20
"""Space (px) above the title, and between the title's last line and the plot."""
DEFAULT_WIDTH = 700
"""The width (px) plotly exports a figure at when its layout sets none (HTML pages fill the window)."""
_SOFT_BREAK = "\u200b<br>"  # a break fit_title inserted (zero-width space marks it), undone before re-wrapping
_REFERENCE = re.compile(r"<br><span style='font-size:(\d+)px;color:#666'>(.*)</span>$", re.S)


def style(fig: go.Figure, title: str, xlabel: str, ylabel: str) -> go.Figure:
    """The package's look: template, a left-aligned title at the top (a ``\\n`` breaks its line, text
    escaped, long lines wrapped to the figure's width by :func:`fit_title`), axis titles, font size."""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": "<br>".join(html.escape(line) for line in title.split("\n")), "x": 0.02, "xanchor": "left",
               "y": 1.0, "yref": "container", "yanchor": "top", "pad": {"t": TITLE_PAD},
               "font": {"size": TITLE_SIZE}},
        xaxis_title=xlabel,
        yaxis_title=ylabel,
        font={"size": 13},
        hoverlabel={"align": "left"},
    )
    return fit_title(fig)


def _title_parts(text: str) -> tuple[list[list[str]], tuple[list[str], int] | None]:
    """The title's paragraphs (``<br>``-separated), each a list of plain-text lines, and the reference's
    (lines, font size) or None; a break :func:`fit_title` inserted separates lines of one paragraph."""
    def lines(part: str) -> list[str]:
        return [html.unescape(line) for line in part.split(_SOFT_BREAK)]

    match = _REFERENCE.search(text)
    main = text[:match.start()] if match else text
    paragraphs = [lines(p) for p in re.split(f"(?<!{_SOFT_BREAK[0]})<br>", main)]
    return paragraphs, (lines(match.group(2)), int(match.group(1))) if match else None


def title_lines(fig: go.Figure) -> list[tuple[str, int]]:
    """Every line of ``fig``'s title as drawn: (plain text, font size in px)."""
    paragraphs, reference = _title_parts(fig.layout.title.text or "")
    size = fig.layout.title.font.size or TITLE_SIZE
    return [(line, size) for p in paragraphs for line in p] + ([(line, reference[1]) for line in reference[0]]
                                                               if reference else [])


def title_margin(lines: int) -> int:
    """The top margin (px) that holds ``lines`` title lines above the plot."""
    return math.ceil(TITLE_PAD + lines * LINE_HEIGHT * TITLE_SIZE + TITLE_GAP)


def fit_title(fig: go.Figure) -> go.Figure:
    """Wrap the title's lines (and its reference line) at spaces to the figure's width (``layout.width``,
    else plotly's export width 700 px; :data:`CHAR_EM` x the font size per character) and make the
    top margin hold them: a margin this function set follows the new line count, a larger one a
    figure chose is kept. Idempotent; :func:`style` and :func:`save` call it."""
    text = fig.layout.title.text
    if not text:
        return fig
    before = len(title_lines(fig))
    room = (fig.layout.width or DEFAULT_WIDTH) * (1 - (fig.layout.title.x or 0.0)) - 16

    def wrap(lines: list[str], size: int) -> list[str]:
        chars = max(20, int(room / (CHAR_EM * size)))
        return textwrap.wrap(" ".join(lines), chars, break_long_words=False, break_on_hyphens=False) or [""]

    paragraphs, reference = _title_parts(text)
    size = fig.layout.title.font.size or TITLE_SIZE
    wrapped = [wrap(p, size) for p in paragraphs] + ([wrap(*reference)] if reference else [])
    joined = [_SOFT_BREAK.join(html.escape(line) for line in p) for p in wrapped]
    if reference:
        joined[-1] = f"<span style='font-size:{reference[1]}px;color:#666'>{joined[-1]}</span>"
    lines = sum(map(len, wrapped))
    chosen, needed = fig.layout.margin.t, title_margin(lines)
    top = needed if chosen is None or chosen == title_margin(before) else max(chosen, needed)
    # plotly draws a title of several lines half a line higher than a one-line title: pad it down
    pad = TITLE_PAD + (LINE_HEIGHT * TITLE_SIZE / 2 if lines > 1 else 0)
    fig.update_layout(title_text="<br>".join(joined), title_pad_t=pad, margin_t=top)
    return fig


def add_reference(fig: go.Figure, text: str) -> go.Figure:
    """A grey line under the title (e.g. the paper's value for the same analysis), wrapped to the
    figure's width."""
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=title + f"<br><span style='font-size:{REFERENCE_SIZE}px;color:#666'>"
                      + html.escape(text) + "</span>")
    return fit_title(fig)


def token_label(text: object) -> str:
    """A tick/legend label that shows ``<bos>``-like tokens and spaces as written."""
    return html.escape(str(text)).replace(" ", "&nbsp;") or "&nbsp;"


def rgba(hex_colour: str, alpha: float) -> str:
    """``"rgba(r,g,b,alpha)"`` of a ``"#rrggbb"`` colour (bands drawn behind their line)."""
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i: i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _check_shape(name: str, x: Tensor, shape: torch.Size, like: str) -> None:
    if x.shape != shape:
        raise PlotError(f"{name} has shape {tuple(x.shape)} but {like} has {tuple(shape)}; they must match")


def drift_heatmap(
    before: Float[Tensor, "layer head"],
    after: Float[Tensor, "layer head"],
    *,
    title: str = "Attention drift per head",
    value: str = "delta",
    kl: Float[Tensor, "layer head"] | None = None,
    drift_ci: tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]] | None = None,
) -> go.Figure:
    """Layer x head heatmap of a per-head attention quantity before and after an edit.

    ``value`` picks the colour: ``"delta"`` = after - before on a diverging scale centred
    at 0 (red: more attention after the edit), ``"after"`` = the post-edit value, ``"kl"`` =
    the ``kl`` tensor (needs ``kl``). The hover of every cell shows layer, head, before,
    after, drift (after - before), the drift's (low, high) interval ``drift_ci`` and KL when
    given, whatever the colour.
    """
    if value not in DRIFT_VALUES:
        raise PlotError(f"value must be one of {DRIFT_VALUES}, not {value!r}")
    if value == "kl" and kl is None:
        raise PlotError("value='kl' needs the per-head KL tensor: pass kl=<[layer, head] tensor>")
    b, a = _values(before), _values(after)
    _check_shape("after", a, b.shape, "before")
    delta = a - b
    layers, heads = b.shape
    fields = [("before", b), ("after", a), ("drift", delta)]
    if drift_ci is not None:
        low, high = (_values(t) for t in drift_ci)
        _check_shape("drift_ci", low, b.shape, "before")
        _check_shape("drift_ci", high, b.shape, "before")
        fields += [("drift 95% CI low", low), ("drift 95% CI high", high)]
    if kl is not None:
        k = _values(kl)
        _check_shape("kl", k, b.shape, "before")
        fields.append(("KL", k))
    z = {"delta": delta, "after": a, "kl": fields[-1][1]}[value]
    colour = {"colorscale": DIVERGING, "zmid": 0.0} if value == "delta" else {"colorscale": SEQUENTIAL}
    hover = "layer %{y}, head %{x}<br>" + "<br>".join(
        f"{name}: %{{customdata[{i}]:.4g}}" for i, (name, _) in enumerate(fields)
    ) + "<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(heads)),
            y=list(range(layers)),
            customdata=torch.stack([t for _, t in fields], dim=-1).tolist(),
            hovertemplate=hover,
            colorbar={"title": {"after": "after", "kl": "KL", "delta": "after − before"}[value]},
            hoverongaps=False,
            **colour,
        )
    )
    fig.update_yaxes(autorange="reversed", dtick=1 if layers <= 48 else None)
    fig.update_xaxes(dtick=1 if heads <= 32 else None)
    fig.update_layout(height=min(1400, max(450, 18 * layers + 200)))
    return style(fig, title, "head", "layer")


def patching_heatmap(
    recovery: Float[Tensor, "row col"],
    row_labels: Sequence[object],
    col_labels: Sequence[object],
    title: str = "Patching recovery",
    zmid: int | float | None = 0.0,
    *,
    row_title: str = "layer",
    col_title: str = "component",
    value_name: str = "recovery",
    ci: tuple[Float[Tensor, "row col"], Float[Tensor, "row col"]] | None = None,
) -> go.Figure:
    """Heatmap of a patching result: layer x component, layer x head, or position x layer
    (contamination, with the prompt's tokens as ``row_labels``).

    Colours use a diverging scale centred at ``zmid`` (a sequential one when ``zmid`` is
    None). NaN cells are left blank. Hover shows the row label, column label and value, and
    the cell's (low, high) interval ``ci`` when given.
    """
    z = _values(recovery)
    rows, cols = z.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise PlotError(
            f"recovery is {rows} x {cols} but got {len(row_labels)} row labels and "
            f"{len(col_labels)} column labels; give one label per row and per column"
        )
    row_text, col_text = [token_label(r) for r in row_labels], [token_label(c) for c in col_labels]
    custom = [[[row_text[i], col_text[j]] for j in range(cols)] for i in range(rows)]
    ci_hover = ""
    if ci is not None:
        low, high = (_values(t) for t in ci)
        _check_shape("ci", low, z.shape, "recovery")
        _check_shape("ci", high, z.shape, "recovery")
        for i in range(rows):
            for j in range(cols):
                custom[i][j] += [f"{float(low[i, j]):.3g}", f"{float(high[i, j]):.3g}"]
        ci_hover = "<br>95% CI: [%{customdata[2]}, %{customdata[3]}]"
    colour = {"colorscale": DIVERGING, "zmid": zmid} if zmid is not None else {"colorscale": SEQUENTIAL}
    fig = go.Figure(
        go.Heatmap(
            z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
            x=list(range(cols)),
            y=list(range(rows)),
            customdata=custom,
            hovertemplate=(
                f"{row_title}: %{{customdata[0]}}<br>{col_title}: %{{customdata[1]}}<br>"
                f"{value_name}: %{{z:.4g}}{ci_hover}<extra></extra>"
            ),
            colorbar={"title": value_name},
            hoverongaps=False,
            **colour,
        )
    )
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(rows)), ticktext=row_text)
    fig.update_xaxes(tickmode="array", tickvals=list(range(cols)), ticktext=col_text)
    fig.update_layout(height=min(1400, max(450, 18 * rows + 200)))
    return style(fig, title, col_title, row_title)


def recovery_curves(
    recovery: Mapping[str, Float[Tensor, " layer"]],
    title: str = "Recovery per layer",
    *,
    ci: Mapping[str, tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]] | None = None,
    x: Sequence[int | float] | None = None,
    xlabel: str = "layer",
    ylabel: str = "recovery",
) -> go.Figure:
    """One line per component (e.g. ``{"attn": ..., "mlp": ..., "resid": ...}``) over layers.

    ``ci`` maps a component to its (lower, upper) bounds, drawn as a shaded band in the
    line's colour. ``x`` replaces the layer index (e.g. window centres); by default the
    i-th value is plotted at layer i.
    """
    if not recovery:
        raise PlotError("recovery is empty: give at least one {component: [layer] tensor}")
    ci = ci or {}
    unknown = set(ci) - set(recovery)
    if unknown:
        raise PlotError(f"ci has components {sorted(unknown)} that are not in recovery {sorted(recovery)}")
    fig = go.Figure()
    for i, (name, values) in enumerate(recovery.items()):
        y = _values(values)
        xs = list(range(len(y))) if x is None else list(x)
        if len(xs) != len(y):
            raise PlotError(f"component {name!r} has {len(y)} values but x has {len(xs)}")
        colour = PALETTE[i % len(PALETTE)]
        if name in ci:
            lo, hi = (_values(t) for t in ci[name])
            if lo.shape != y.shape or hi.shape != y.shape:
                raise PlotError(f"ci[{name!r}] bounds must have the same length as its curve ({len(y)})")
            fig.add_trace(go.Scatter(
                x=xs + xs[::-1], y=hi.tolist() + lo.flip(0).tolist(), fill="toself",
                fillcolor=rgba(colour, 0.2), line={"width": 0}, hoverinfo="skip",
                showlegend=False, legendgroup=name, name=f"{name} 95% CI",
            ))
        fig.add_trace(go.Scatter(
            x=xs, y=y.tolist(), mode="lines+markers", name=name, legendgroup=name,
            line={"color": colour}, hovertemplate=f"{name}<br>{xlabel} %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    return style(fig, title, xlabel, ylabel)


def _fmt_ci(low: float, high: float) -> str:
    return "" if not (math.isfinite(low) and math.isfinite(high)) else f" [{low:.2f}, {high:.2f}]"


CORRELATION_SYMBOLS = {"pearson": "Pearson r", "spearman": "Spearman ρ"}


def correlation_label(c: Mapping) -> str:
    """``"Pearson r = 0.193 [-0.05, 0.41], p = 0.11"`` of a correlation dict
    (:meth:`attention_drift.reports.stats.Correlation.to_dict`): every coefficient named by its kind."""
    if c.get("method") not in CORRELATION_SYMBOLS:
        raise PlotError(f"a correlation needs its method ('pearson' or 'spearman'), got {c.get('method')!r}")
    r = c["r"]
    text = f"{CORRELATION_SYMBOLS[c['method']]} = " + ("nan" if not math.isfinite(r) else f"{r:.3f}")
    text += _fmt_ci(c.get("ci_low", math.nan), c.get("ci_high", math.nan))
    p = c.get("p_value")
    return text + ("" if p is None or not math.isfinite(p) else f", p = {p:.2g}")


def auroc_label(a: Mapping) -> str:
    """``"AUROC = 0.57 [0.45, 0.69] (cluster bootstrap)"`` of an AUROC dict
    (:meth:`attention_drift.reports.stats.AurocEstimate.to_dict`)."""
    value = a["value"]
    text = "AUROC = " + ("nan" if not math.isfinite(value) else f"{value:.3f}")
    text += _fmt_ci(a.get("ci_low", math.nan), a.get("ci_high", math.nan))
    return text + (f" ({a['method']})" if a.get("method") and math.isfinite(a.get("ci_low", math.nan)) else "")


def drift_vs_failure(
    drift: Float[Tensor, " n"],
    failure: Float[Tensor, " n"],
    *,
    failed: Sequence[bool] | Tensor | None = None,
    bins: int = 10,
    correlations: Sequence[Mapping] | None = None,
    auroc: Mapping | None = None,
    n_records: int | None = None,
    note: str = "",
    title: str = "Attention drift vs specificity failure",
    xlabel: str = "attention drift",
    ylabel: str = "failure severity",
) -> go.Figure:
    """Scatter of one point per case plus the binned mean curve, annotated with the statistics.

    Bins hold equal numbers of cases (cases sorted by drift, split into ``bins`` near-equal
    chunks); each bin is drawn at its mean drift and mean failure with a 95% normal error
    bar (1.96 x standard error of the mean; 0 for a one-case bin). ``failed`` colours the
    points (failed / held). The annotation names every statistic by its kind: ``correlations``
    (dicts of :meth:`attention_drift.reports.stats.Correlation.to_dict`, e.g. Pearson and Spearman with
    their 95% intervals; by default both computed from the points, Fisher-z intervals), the
    ``auroc`` dict of the factor for failure when given, and n (cases, and ``n_records``);
    ``note`` adds a last line (e.g. which prompts are shown). One panel of
    :func:`drift_vs_failure_panels`.
    """
    panel = {"drift": drift, "failure": failure, "failed": failed, "bins": bins, "correlations": correlations,
             "auroc": auroc, "n_records": n_records, "note": note, "xlabel": xlabel}
    return drift_vs_failure_panels([panel], title=title, ylabel=ylabel)


def _panel_stats(x: Tensor, y: Tensor, panel: Mapping, ylabel: str) -> str:
    correlations = panel.get("correlations")
    if correlations is None:
        correlations = [pearson(x, y).to_dict(), spearman(x, y).to_dict()]
    lines = [f"{correlation_label(c)} (vs {html.escape(ylabel)})" for c in correlations]
    if panel.get("auroc") is not None:
        lines.append(f"{auroc_label(panel['auroc'])} for failure")
    n = f"n = {x.numel()} cases"
    if panel.get("n_records") is not None:
        n += f", {panel['n_records']} records"
    lines.append(n)
    if panel.get("note"):
        lines.append(html.escape(panel["note"]))
    return "<br>".join(lines)


def drift_vs_failure_panels(
    panels: Sequence[Mapping],
    *,
    title: str = "Attention drift vs specificity failure",
    ylabel: str = "failure severity",
) -> go.Figure:
    """:func:`drift_vs_failure` panels side by side on one y axis (e.g. the attention-mass
    factor beside the KL factor). Each panel is a mapping of that function's arguments:
    ``drift``, ``failure`` (tensors), and optionally ``failed``, ``bins`` (default 10, at most n),
    ``correlations``, ``auroc``, ``n_records``, ``note``, ``xlabel``."""
    if not panels:
        raise PlotError("drift_vs_failure_panels needs at least one panel")
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.06)
    for col, panel in enumerate(panels, start=1):
        x, y = _values(torch.as_tensor(panel["drift"])), _values(torch.as_tensor(panel["failure"]))
        xlabel = panel.get("xlabel", "attention drift")
        if x.shape != y.shape:
            raise PlotError(f"drift has {x.numel()} values but failure has {y.numel()}; one pair per case")
        n = x.numel()
        if n < 2:
            raise PlotError(f"need at least 2 cases to plot a relation, got {n}")
        bad = int((~torch.isfinite(x) | ~torch.isfinite(y)).sum())
        if bad:
            raise PlotError(f"{bad} of {n} cases have a non-finite drift or failure value; drop them first")
        bins = panel.get("bins", min(10, n))
        if not 1 <= bins <= n:
            raise PlotError(f"bins must be between 1 and the number of cases ({n}), not {bins}")
        failed = panel.get("failed")
        if failed is not None:
            failed = torch.as_tensor(failed, dtype=torch.bool).cpu()
            if failed.shape != x.shape:
                raise PlotError(f"failed has {failed.numel()} values for {n} cases; one per case")
        order = torch.argsort(x)
        centres, means, errors, counts = [], [], [], []
        for chunk in torch.tensor_split(order, bins):
            ys = y[chunk]
            centres.append(float(x[chunk].mean()))
            means.append(float(ys.mean()))
            errors.append(1.96 * float(ys.std()) / math.sqrt(len(chunk)) if len(chunk) > 1 else 0.0)
            counts.append(len(chunk))
        hover = f"{html.escape(xlabel)}: %{{x:.4g}}<br>{html.escape(ylabel)}: %{{y:.4g}}<extra></extra>"
        groups = [("cases", torch.ones_like(x, dtype=torch.bool), PALETTE[0])] if failed is None else [
            ("held (right after the edit)", ~failed, PALETTE[0]), ("failed", failed, PALETTE[1])]
        for name, keep, colour in groups:
            fig.add_trace(go.Scatter(
                x=x[keep].tolist(), y=y[keep].tolist(), mode="markers", name=name, legendgroup=name,
                showlegend=col == 1, marker={"size": 6, "opacity": 0.5, "color": colour}, hovertemplate=hover,
            ), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=centres, y=means, mode="lines+markers", name=f"binned mean ± 95% CI ({bins} bins)",
            legendgroup="binned", showlegend=col == 1, line={"color": PALETTE[2], "width": 3},
            error_y={"type": "data", "array": errors, "visible": True},
            customdata=counts,
            hovertemplate=(f"bin mean {html.escape(xlabel)}: %{{x:.4g}}<br>mean {html.escape(ylabel)}: %{{y:.4g}}"
                           "<br>cases: %{customdata}<extra></extra>"),
        ), row=1, col=col)
        axis = "x" if col == 1 else f"x{col}"
        fig.add_annotation(text=_panel_stats(x, y, panel, ylabel), xref=f"{axis} domain", yref="y domain",
                           x=0.02, y=0.98, showarrow=False, xanchor="left", yanchor="top", align="left",
                           bgcolor="rgba(255,255,255,0.8)", font={"size": 11})
        fig.update_xaxes(title_text=html.escape(xlabel).replace(": ", ":<br>", 1), title_font={"size": 12},
                         row=1, col=col)
    fig.update_layout(height=520, width=max(700, 560 * len(panels)))
    return style(fig, title, fig.layout.xaxis.title.text, ylabel)


def _lines(text: str) -> str:
    return "<br>".join(html.escape(line) for line in text.split("\n"))


def forest(
    panels: Mapping[str, Sequence[Mapping]],
    *,
    title: str,
    xlabel: str = "estimate",
    reference: float | None = 0.0,
    row_height: int = 46,
    width: int | None = None,
) -> go.Figure:
    """Point estimates with their intervals (a forest plot), one panel per key of ``panels``
    side by side on shared rows. Each row is a mapping: ``label`` (its row; a ``\\n`` breaks
    the line; the first label seen is the top row), ``value``, ``ci_low``, ``ci_high``,
    ``series`` (legend entry and colour) and optionally ``hover`` (more hover text). The
    interval is drawn as an error bar (none where it is not finite); rows with a non-finite
    value are left out. Every panel has the same x range (all values, intervals and
    ``reference``), so panels compare by eye. A dotted line marks ``reference`` (None: none)."""
    if not panels:
        raise PlotError("forest needs at least one panel")
    every = [row for rows in panels.values() for row in rows]
    labels = list(dict.fromkeys(_lines(row["label"]) for row in every))
    series = list(dict.fromkeys(row["series"] for row in every))
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[html.escape(name) for name in panels])
    shown = set()
    for col, (name, rows) in enumerate(panels.items(), start=1):
        for k, s in enumerate(series):
            chosen = [r for r in rows if r["series"] == s and math.isfinite(r["value"])]
            if not chosen:
                continue
            values = [float(r["value"]) for r in chosen]

            def side(r, key, sign):
                return sign * (r[key] - r["value"]) if math.isfinite(r[key]) else 0.0

            text = [f"{_lines(r['label'])}<br>{html.escape(name)}: {r['value']:.3f}"
                    f"{_fmt_ci(r['ci_low'], r['ci_high'])}" + (f"<br>{_lines(r['hover'])}" if r.get("hover") else "")
                    for r in chosen]
            fig.add_trace(go.Scatter(
                x=values, y=[_lines(r["label"]) for r in chosen], mode="markers", name=html.escape(s), legendgroup=s,
                showlegend=s not in shown, marker={"size": 9, "color": PALETTE[k % len(PALETTE)]},
                error_x={"type": "data", "symmetric": False, "array": [side(r, "ci_high", 1) for r in chosen],
                         "arrayminus": [side(r, "ci_low", -1) for r in chosen], "thickness": 1.5},
                hovertext=text, hoverinfo="text"), row=1, col=col)
            shown.add(s)
        if reference is not None:
            fig.add_vline(x=reference, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=labels[::-1])
    ends = [v for r in every for v in (r["value"], r["ci_low"], r["ci_high"]) if math.isfinite(v)]
    if reference is not None:
        ends.append(reference)
    if ends:
        pad = 0.05 * (max(ends) - min(ends) or 1.0)
        fig.update_xaxes(range=[min(ends) - pad, max(ends) + pad])
    fig.update_layout(height=180 + row_height * len(labels), width=width or max(600, 380 * len(panels)),
                      legend={"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0})
    style(fig, title, xlabel, "")
    fig.update_xaxes(title_text=html.escape(xlabel))
    return fig


def _interval(entry: Mapping, where: str) -> tuple[float, float, float]:
    if "accuracy" not in entry:
        raise PlotError(f"{where} has no 'accuracy'; expected {{'accuracy': a, 'ci95': [lo, hi]}}")
    acc = float(entry["accuracy"])
    ci = entry.get("ci95")
    if ci is None:
        return acc, acc, acc
    if isinstance(ci, (int, float)):
        return acc, acc - float(ci), acc + float(ci)
    if len(ci) != 2:
        raise PlotError(f"{where}['ci95'] must be [lo, hi] or a half-width, got {ci!r}")
    return acc, float(ci[0]), float(ci[1])


def _bars(summary: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str], percent: bool,
          colours: Mapping[str, str]) -> list[go.Bar]:
    """One bar trace per setting of ``summary`` (x: the metrics), with its 95% CI error bars."""
    scale = 100.0 if percent else 1.0
    traces = []
    for setting, groups in summary.items():
        acc, up, down = [], [], []
        for metric in metrics:
            if metric in groups and groups[metric].get("accuracy", 0.0) is not None:
                a, lo, hi = _interval(groups[metric], f"summary[{setting!r}][{metric!r}]")
                acc.append(a * scale)
                up.append((hi - a) * scale)
                down.append((a - lo) * scale)
            else:
                acc.append(None)
                up.append(None)
                down.append(None)
        traces.append(go.Bar(
            name=setting, x=[m.replace("_", " ") for m in metrics], y=acc, marker_color=colours[setting],
            error_y={"type": "data", "array": up, "arrayminus": down, "visible": True},
            hovertemplate=f"{html.escape(setting)}<br>%{{x}}: %{{y:.1f}}<extra></extra>" if percent
            else f"{html.escape(setting)}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    return traces


def _metrics_and_colours(summaries: Sequence[Mapping], metrics: Sequence[str] | None):
    if not summaries or not all(summaries):
        raise PlotError("summary is empty: give {setting: {metric: {'accuracy': a, 'ci95': [lo, hi]}}}")
    if metrics is None:
        metrics = list(dict.fromkeys(m for s in summaries for groups in s.values() for m in groups))
    settings = list(dict.fromkeys(name for s in summaries for name in s))
    return metrics, {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(settings)}


def metric_bars(
    summary: Mapping[str, Mapping[str, Mapping]],
    title: str = "Editing metrics",
    *,
    metrics: Sequence[str] | None = None,
    percent: bool = True,
    ylabel: str | None = None,
) -> go.Figure:
    """Grouped bars: one group per metric, one bar per setting, with 95% CI error bars.

    ``summary`` is ``{setting: {metric: {"accuracy": a, "ci95": [lo, hi]}}}`` (``ci95`` may
    also be a half-width), e.g. from :func:`bars_from_summaries`. Accuracies are taken as
    fractions and shown x100 when ``percent``. ``metrics`` fixes which metrics appear and
    in what order (default: every metric, in order of first appearance); a setting lacking
    a metric (or with accuracy None) leaves a gap.
    """
    metrics, colours = _metrics_and_colours([summary], metrics)
    fig = go.Figure(_bars(summary, metrics, percent, colours))
    fig.update_layout(barmode="group")
    return style(fig, title, "metric", ylabel or ("accuracy (%)" if percent else "accuracy"))


def metric_bar_panels(
    panels: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
    title: str = "Editing metrics",
    *,
    metrics: Sequence[str] | None = None,
    percent: bool = True,
    ylabel: str | None = None,
) -> go.Figure:
    """:func:`metric_bars` side by side on one y axis, one panel per ``{panel title: summary}`` (e.g.
    the results beside the sanity checks), each as wide as its number of settings; a setting keeps
    its colour in every panel and has one legend entry."""
    metrics, colours = _metrics_and_colours(list(panels.values()), metrics)
    widths = [len(s) for s in panels.values()]
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.06,
                        column_widths=[w / sum(widths) for w in widths], subplot_titles=list(panels))
    shown = set()
    for col, summary in enumerate(panels.values(), start=1):
        for trace in _bars(summary, metrics, percent, colours):
            trace.update(legendgroup=trace.name, showlegend=trace.name not in shown)  # one entry toggles all panels
            shown.add(trace.name)
            fig.add_trace(trace, row=1, col=col)
    labels = [m.replace("_", " ") for m in metrics]
    fig.update_xaxes(tickmode="array", tickvals=labels, ticktext=["<br>".join(textwrap.wrap(m, 18)) for m in labels],
                     tickangle=0)
    fig.update_annotations(font_size=14)  # the panel titles
    fig.update_layout(barmode="group", legend_tracegroupgap=0)
    return style(fig, title, "metric", ylabel or ("accuracy (%)" if percent else "accuracy"))


def metric_dots(
    summary: Mapping[str, Mapping[str, Mapping]],
    title: str = "Editing metrics",
    *,
    metrics: Sequence[str] | None = None,
    series: Callable[[str], str] | None = None,
    percent: bool = True,
) -> go.Figure:
    """:func:`metric_bars`' input as a :func:`forest`: one panel per metric, one row per setting
    (top to bottom in ``summary``'s order), the accuracy with its 95% CI. Readable where bars are
    not: a dozen settings stay a dozen labelled rows. ``series(setting)`` names the legend entry
    and colour of a row (e.g. the SADR variant; default: the setting itself)."""
    metrics, _ = _metrics_and_colours([summary], metrics)
    scale = 100.0 if percent else 1.0
    panels = {}
    for metric in metrics:
        rows = []
        for setting, groups in summary.items():
            if metric in groups and groups[metric].get("accuracy") is not None:
                a, lo, hi = _interval(groups[metric], f"summary[{setting!r}][{metric!r}]")
                rows.append({"label": setting, "value": a * scale, "ci_low": lo * scale, "ci_high": hi * scale,
                             "series": series(setting) if series else setting})
        panels[metric.replace("_", " ")] = rows
    return forest(panels, title=title, xlabel="accuracy (%)" if percent else "accuracy", reference=None,
                  row_height=28, width=min(1600, 260 * len(metrics) + 160))


def bars_from_summaries(named_summaries: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
    """Turn ``{name: summarize_json}`` into :func:`metric_bars` input.

    Each value is the JSON of ``attention-drift summarize --json``
    (``{"groups": {group: {"pre": {...}, "post": {...}}}, "meta": {...}}``). The result has
    ``"pre-edit"`` first, taken once from the first summary that has pre-edit numbers,
    then one entry per name holding its post-edit numbers (names without any post-edit
    numbers, e.g. ``--method none`` runs, contribute only the pre-edit entry). Groups
    without an accuracy (fluency) are left out.
    """
    pre: dict[str, dict] = {}
    post: dict[str, dict[str, dict]] = {}
    for name, summary in named_summaries.items():
        groups = summary.get("groups") if isinstance(summary, Mapping) else None
        if not isinstance(groups, Mapping):
            raise PlotError(
                f"summary {name!r} has no 'groups' mapping; pass the JSON of "
                "`attention-drift summarize FILE --json`"
            )
        phases = {g: p for g, p in groups.items() if isinstance(p, Mapping)}
        if not pre:
            pre = {g: dict(p["pre"]) for g, p in phases.items() if "accuracy" in (p.get("pre") or {})}
        mine = {g: dict(p["post"]) for g, p in phases.items() if "accuracy" in (p.get("post") or {})}
        if mine:
            post[name] = mine
    if not pre and not post:
        raise PlotError("none of the summaries holds an accuracy; nothing to plot")
    return ({"pre-edit": pre} if pre else {}) | post


def tradeoff_curve(
    xs: Sequence[int | float | str],
    series: Mapping[str, Sequence[int | float]],
    xlabel: str = "SADR weight γ",
    title: str = "Efficacy vs specificity trade-off",
    *,
    log_x: bool = False,
    ylabel: str = "accuracy",
    ci: Mapping[str, Sequence[Sequence[int | float] | int | float]] | None = None,
) -> go.Figure:
    """Lines of several metrics (e.g. efficacy, paraphrase, distract neighbourhood) over a
    swept setting ``xs`` (e.g. the SADR weight); ``log_x`` puts x on a log scale. ``xs`` given as
    strings are categories, evenly spaced in the given order (e.g. ``"0 (ROME)"`` beside
    ``"0.01"``: no scale claimed). ``ci`` maps a series to one interval per x, ``(low, high)`` or a
    half-width in the series' units, drawn as error bars."""
    if not xs or not series:
        raise PlotError("tradeoff_curve needs at least one x value and one series")
    categorical = any(isinstance(v, str) for v in xs)
    xs = [str(v) for v in xs] if categorical else [float(v) for v in xs]
    if log_x and (categorical or min(xs) <= 0):
        raise PlotError(
            f"log_x needs positive numeric x values but got {min(xs)!r}; drop the x <= 0 point "
            "(e.g. the γ = 0 baseline), give the x values as category labels, or set log_x=False"
        )
    ci = ci or {}
    unknown = set(ci) - set(series)
    if unknown:
        raise PlotError(f"ci has series {sorted(unknown)} that are not in series {sorted(series)}")
    fig = go.Figure()
    for i, (name, ys) in enumerate(series.items()):
        if len(ys) != len(xs):
            raise PlotError(f"series {name!r} has {len(ys)} values but xs has {len(xs)}")
        ys = [float(v) for v in ys]
        error = None
        if name in ci:
            if len(ci[name]) != len(xs):
                raise PlotError(f"ci[{name!r}] has {len(ci[name])} intervals but xs has {len(xs)}")
            bounds = [(y - c, y + c) if isinstance(c, (int, float)) else (float(c[0]), float(c[1]))
                      for y, c in zip(ys, ci[name])]
            error = {"type": "data", "array": [hi - y for y, (_, hi) in zip(ys, bounds)],
                     "arrayminus": [y - lo for y, (lo, _) in zip(ys, bounds)], "visible": True}
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=name, line={"color": PALETTE[i % len(PALETTE)]}, error_y=error,
            hovertemplate=(f"{html.escape(name)}<br>{xlabel} %{{x{'' if categorical else ':.4g'}}}: %{{y:.4g}}"
                           "<extra></extra>"),
        ))
    if log_x:
        fig.update_xaxes(type="log")
    if categorical:
        fig.update_xaxes(type="category")
    return style(fig, title, xlabel, ylabel)


LABEL_SPOTS = {"top right": (1, 1), "bottom right": (1, -1), "top left": (-1, 1), "bottom left": (-1, -1),
               "middle right": (1, 0), "middle left": (-1, 0), "top center": (0, 1), "bottom center": (0, -1)}
"""Where a point's number may sit (plotly ``textposition``: unit offsets in x and y), in the order tried:
the corners first, off the point's own error bars."""


def label_positions(points: Sequence[tuple[float, float]], x_range: tuple[float, float],
                    y_range: tuple[float, float], size: tuple[float, float] = (0.02, 0.04)) -> list[str]:
    """A ``textposition`` per point, so that short labels (numbers) beside markers neither overlap
    each other nor sit on another marker: the first spot of :data:`LABEL_SPOTS` whose label box
    (``size``: width, height as fractions of the axes) is free, else the least crowded one."""
    def norm(x, y):
        return (x - x_range[0]) / ((x_range[1] - x_range[0]) or 1), (y - y_range[0]) / ((y_range[1] - y_range[0]) or 1)

    w, h = size
    marks = [norm(*p) for p in points]
    boxes, chosen = [], []
    for mx, my in marks:
        def clashes(spot):
            dx, dy = LABEL_SPOTS[spot]
            cx, cy = mx + dx * w, my + dy * h
            hits = sum(abs(cx - bx) < w and abs(cy - by) < h for bx, by in boxes)
            return hits + sum(abs(cx - px) < w * 0.75 and abs(cy - py) < h * 0.75
                              for px, py in marks if (px, py) != (mx, my))
        spot = min(LABEL_SPOTS, key=lambda k: (clashes(k), list(LABEL_SPOTS).index(k)))
        dx, dy = LABEL_SPOTS[spot]
        boxes.append((mx + dx * w, my + dy * h))
        chosen.append(spot)
    return chosen


def recovery_tradeoff(
    points: Mapping[str, Sequence[Mapping]],
    title: str = "SADR variants: distract loss recovered vs paraphrase cost",
    *,
    cost_label: str = "paraphrase",
    y_range: tuple[float, float] | None = (-60, 170),
) -> go.Figure:
    """One marker per variant: x = its paraphrase accuracy minus the plain editor's (points),
    y = the share of the plain editor's distract-neighbourhood loss it wins back (%), both with
    95% CIs; one colour per key of ``points`` (e.g. the tuning and the report half). Every marker
    carries a number, placed so that numbers do not overlap (:func:`label_positions`), and the
    legend is the key: per series, ``number variant (records)``. Points are
    :func:`attention_drift.reports.evaluation.tradeoff` entries. ``y_range``: the y axis shown
    (longer intervals run off it; None: fit everything)."""
    if not points or not any(points.values()):
        raise PlotError("recovery_tradeoff needs at least one point: {series: [report.tradeoff entries]}")
    flat = [(i, series, e) for i, (series, entries) in enumerate(points.items()) for e in entries]

    def interval(e, key, value):
        lo, hi = e[key] or [e[value]] * 2
        return 100 * (hi - e[value]), 100 * (e[value] - lo)

    xy = [(100 * e["cost_diff"], 100 * e["recovered"]) for _, _, e in flat]

    def extent(value, key):  # every point and interval end, in points / %
        return [100 * v for _, _, e in flat for v in [e[value], *(e[key] or [])]]

    xs, ys = extent("cost_diff", "cost_ci95"), extent("recovered", "recovered_ci95")
    shown_y = (float(y_range[0]), float(y_range[1])) if y_range is not None else (min(ys), max(ys))
    spots = label_positions(xy, (min(xs), max(xs)), shown_y)
    fig = go.Figure()
    for number, ((i, series, e), (x, y), spot) in enumerate(zip(flat, xy, spots), start=1):
        x_up, x_down = interval(e, "cost_ci95", "cost_diff")
        y_up, y_down = interval(e, "recovered_ci95", "recovered")
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers+text", text=[str(number)], textposition=spot,
            textfont={"color": colour, "size": 12}, name=f"{number}  {e['variant']} ({e['n_records']} records)",
            legendgroup=series, legendgrouptitle_text=series, marker={"color": colour, "size": 9},
            error_x={"type": "data", "array": [x_up], "arrayminus": [x_down], "visible": True, "thickness": 1},
            error_y={"type": "data", "array": [y_up], "arrayminus": [y_down], "visible": True, "thickness": 1},
            customdata=[[e["variant"], e["n_records"], 100 * (e["efficacy"] or 0)]],
            hovertemplate=(f"{number}. {html.escape(series)}: %{{customdata[0]}}<br>{cost_label} %{{x:+.1f}} points<br>"
                           "recovered %{y:.0f}%<br>records %{customdata[1]}, efficacy %{customdata[2]:.1f}%"
                           "<extra></extra>"),
        ))
    fig.add_hline(y=60, line_dash="dot", line_color="grey", annotation_text="60% recovered")
    fig.add_vline(x=-3, line_dash="dot", line_color="grey", annotation_text=f"{cost_label} -3",
                  annotation_position="top left")
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    fig.update_layout(legend={"groupclick": "toggleitem", "tracegroupgap": 12})
    return style(fig, title, f"{cost_label} accuracy minus the plain editor's (points)",
                 "distract-neighbourhood loss recovered (%)")


def _browser() -> str | None:
    """The Chrome/Chromium binary kaleido will use, found the way kaleido finds it."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:
        names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
        return next((p for p in map(shutil.which, names) if p), None)


_INSTALL = (
    "install Chromium and kaleido >= 1: `apt-get install -y chromium` (Debian/Ubuntu; "
    "or set BROWSER_PATH to a Chrome/Chromium binary) and `pip install 'kaleido>=1'` "
    "(= pip install 'attention_drift[png]'). HTML export needs neither."
)


def png_export_problem() -> str | None:
    """Why static export (PNG/SVG/PDF) cannot work here, or None when it should."""
    try:
        version = importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        return f"kaleido is not installed; {_INSTALL}"
    if int(version.split(".")[0]) < 1:
        return f"kaleido {version} is too old (plotly needs >= 1); {_INSTALL}"
    if _browser() is None:
        where = os.environ.get("BROWSER_PATH")
        found = f"BROWSER_PATH={where!r} is not an executable" if where else "no Chrome/Chromium binary found"
        return f"{found}; {_INSTALL}"
    return None


def _write_static(fig: go.Figure, path: Path, fmt: str, scale: int | float) -> None:
    problem = png_export_problem()
    if problem:
        raise PngExportError(f"cannot write {path}: {problem}")
    try:
        data = fig.to_image(format=fmt, scale=scale)
    except Exception as exc:
        raise PngExportError(
            f"cannot write {path}: kaleido failed with {_browser()}: {type(exc).__name__}: {exc}. "
            "Check that the browser starts (`chromium --headless --version`), or " + _INSTALL
        ) from exc
    path.write_bytes(data)


PLOTLY_BUNDLE = "plotly.min.js"
"""The file name of plotly.js beside pages saved with ``plotlyjs="directory"``."""


def write_bundle(folder: Path) -> Path:
    """``folder/plotly.min.js``: this plotly's bundle, written when missing or different (plotly itself
    keeps any file of that name, even another version's)."""
    from plotly.offline import get_plotlyjs

    bundle, js = folder / PLOTLY_BUNDLE, get_plotlyjs()
    if not bundle.is_file() or bundle.read_text(encoding="utf-8") != js:
        bundle.write_text(js, encoding="utf-8")
    return bundle


def save(fig: go.Figure, path: str | os.PathLike, *, scale: int | float = 2, plotlyjs: str = "inline") -> list[Path]:
    """Write ``fig`` (its title first fitted to its width, :func:`fit_title`) and return the written paths.

    ``.html``: a page that opens offline, plotly.js inlined (``plotlyjs="inline"``, ~4.8 MB) or
    loaded from ``plotly.min.js`` in the page's folder (``"directory"``: written there by
    :func:`write_bundle`, so a folder of figures holds plotly.js once and each page is a few kB);
    ``.png`` (also ``.svg``/``.pdf``): static image via kaleido, ``scale`` x the layout
    size; any other name (no suffix, or e.g. ``gamma-0.01``): both ``<name>.html`` and
    ``<name>.png``. Static export needs kaleido >= 1 and Chromium; without them a
    :class:`PngExportError` says what to install (checked before anything is written).
    Each static image starts a headless browser (a few seconds); for many images run
    ``kaleido.start_sync_server()`` first.
    """
    if plotlyjs not in ("inline", "directory"):
        raise PlotError(f"plotlyjs must be 'inline' or 'directory', not {plotlyjs!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        targets = [(path, "html")]
    elif suffix in STATIC_FORMATS:
        targets = [(path, STATIC_FORMATS[suffix])]
    else:
        targets = [(path.with_name(path.name + ".html"), "html"), (path.with_name(path.name + ".png"), "png")]
    if any(fmt != "html" for _, fmt in targets):
        problem = png_export_problem()
        if problem:
            raise PngExportError(f"cannot write {targets[-1][0]}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fit_title(fig)
    for target, fmt in targets:
        if fmt == "html":
            if plotlyjs == "directory":
                write_bundle(target.parent)
            fig.write_html(target, include_plotlyjs=True if plotlyjs == "inline" else "directory", full_html=True)
        else:
            _write_static(fig, target, fmt, scale)
    return [target for target, _ in targets]


def save_figure(fig, path: Path, png: bool) -> list[str]:
    """Write ``fig`` as HTML (plotly.js from ``plotly.min.js`` in the same folder, so the page is small
    enough to commit) and, with ``png``, PNG, with the paper's value for this figure
    (:data:`attention_drift.reports.paper.REPORTED`, by file stem) under its title where the paper gives one."""
    from attention_drift.reports.paper import REPORTED

    if path.name in REPORTED:
        add_reference(fig, REPORTED[path.name])

    written = save(fig, path.with_suffix(".html"), plotlyjs="directory")
    if png:
        try:
            written += save(fig, path.with_suffix(".png"))
        except PngExportError as err:
            print(f"attention-drift: no PNG for {path.name}: {err}", file=sys.stderr)
    return [str(p) for p in written]


def png_ok() -> bool:

    problem = png_export_problem()
    if problem:
        print(f"attention-drift: HTML only, no PNG: {problem}", file=sys.stderr)
    return problem is None
