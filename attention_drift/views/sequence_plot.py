"""Sequential editing drawn: every monitored quantity against the number of edits, several runs
overlaid (one colour per run), from ``sequence.json`` summaries
(:func:`attention_drift.reports.sequence.sequence_summary`)."""

from collections.abc import Mapping

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from attention_drift.views.plots import rgba, style

PANELS = (
    ("Retention of the edits so far", "accuracy", (("efficacy", "ES", "solid"), ("paraphrase", "PS", "dash"))),
    ("Specificity on the probes", "accuracy", (("neighborhood", "NS", "solid"), ("distract_neighborhood", "DNS", "dash"),
                                               ("relation", "RS", "dot"))),
    ("Neighbourhood KL on the probes", "nats", (("nkl", "NKL", "solid"),)),
    ("Fluency on the probes", "n-gram entropy", (("fluency", "FL", "solid"),)),
    ("Largest head drift (subject's last token)", "mean change of mass",
     (("drift:first:max_delta", "first edits", "solid"), ("drift:latest:max_delta", "latest edits", "dash"))),
    ("Heads above the drift threshold", "heads",
     (("drift:first:heads_above", "first edits", "solid"), ("drift:latest:heads_above", "latest edits", "dash"))),
)
"""``(panel title, y label, ((series key, label, dash), ...))``; ``drift:WHICH:KEY`` reads ``summary["drift"]``."""


def _series(summary: Mapping, key: str) -> tuple[list, list | None]:
    if key == "fluency":
        return summary["fluency"], None
    if key.startswith("drift:"):
        _, which, name = key.split(":")
        return summary["drift"][which][name], None
    entry = summary["series"].get(key)
    return (entry["value"], entry["ci95"]) if entry else ([], None)


def sequence_figure(runs: Mapping[str, Mapping], title: str | None = None) -> go.Figure:
    """Six panels (retention, specificity, NKL, fluency, largest head drift, heads above the
    threshold) against the number of edits, one colour per run of ``runs`` (``{label: summary}``),
    95% intervals as bands where the series has them."""
    fig = make_subplots(rows=3, cols=2, subplot_titles=[p[0] for p in PANELS], vertical_spacing=0.1,
                        horizontal_spacing=0.1)
    for r, (label, summary) in enumerate(runs.items()):
        colour = qualitative.Plotly[r % len(qualitative.Plotly)]
        x = summary["edits"]
        for p, (_, ylabel, series) in enumerate(PANELS):
            row, col = divmod(p, 2)
            for key, name, dash in series:
                y, ci = _series(summary, key)
                if not any(v is not None for v in y):
                    continue
                if ci:
                    xs = [a for a, c in zip(x, ci) if c]
                    lo = [c[0] for c in ci if c]
                    hi = [c[1] for c in ci if c]
                    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                                             fillcolor=rgba(colour, 0.12), hoverinfo="skip", showlegend=False),
                                  row=row + 1, col=col + 1)
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{label} · {name}",
                                         line={"color": colour, "dash": dash}, marker={"size": 4},
                                         legendgroup=label), row=row + 1, col=col + 1)
            fig.update_yaxes(title_text=ylabel, row=row + 1, col=col + 1)
            fig.update_xaxes(title_text="edits" if row == 2 else None, row=row + 1, col=col + 1)
    meta = next(iter(runs.values()))["meta"] if runs else {}
    probes = len(meta.get("probes", []))
    text = title or (f"Sequential editing · {meta.get('model', '?')} · {', '.join(runs)} · probes: {probes} records; "
                     f"drift on {meta.get('monitor', {}).get('drift_records', '?')} edited records each")
    fig.update_layout(height=900, width=1000)
    return style(fig, text, "", "")
