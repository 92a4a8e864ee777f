"""The distract suite drawn: accuracy per context (no context, the paper's edit sentence, each
suite context), pre-edit and after each run's edit, from ``summarize --json`` summaries
(:func:`attention_drift.reports.evaluation.summary`, e.g. ``compare``'s ``"runs"``)."""

from collections.abc import Mapping

from attention_drift.measure.evaluate import GROUPS
from attention_drift.views import plots

CONTEXTS = ("neighborhood", "distract_neighborhood", "restated_neighborhood", "mention_neighborhood",
            "distant_neighborhood", "double_neighborhood", "relation", "distract_relation", "mention_relation")
"""The figure's x axis, in order: NS (the no-context reference), DNS and the neighbourhood suite,
then RS, distract relation and its mention version; a context no summary has is left out."""


def _n(entries: list[Mapping]) -> str:
    sizes = list(dict.fromkeys((e.get("n_records"), e["n"]) for e in entries))
    return " | ".join(f"{'?' if r is None else r} / {n}" for r, n in sizes)


def suite_figure(summaries: Mapping[str, Mapping], title: str | None = None):
    """Grouped bars, one group per context of :data:`CONTEXTS` that the summaries have, one bar
    per setting: ``pre-edit`` (the first summary with pre-edit scores) and each summary's
    post-edit accuracy, with its record-clustered bootstrap 95% CI (``ci95_bootstrap``; the
    pooled normal interval where a summary has none). Each context's tick gives its n, records
    / prompts, read from the summaries (several values, ``|``-separated, when the settings differ)."""
    bars = plots.bars_from_summaries(summaries)
    contexts = [g for g in CONTEXTS if any(g in groups for groups in bars.values())]
    if not contexts:
        raise plots.PlotError(f"no summary has any of the contexts {', '.join(CONTEXTS)}; evaluate with --suite")
    labels = {g: f"{GROUPS[g].abbrev or g.replace('_', ' ')}<br>{_n([s[g] for s in bars.values() if g in s])}"
              for g in contexts}
    data = {setting: {labels[g]: {"accuracy": groups[g]["accuracy"],
                                  "ci95": groups[g].get("ci95_bootstrap") or groups[g]["ci95"]}
                      for g in contexts if g in groups}
            for setting, groups in bars.items()}
    meta = next(iter(summaries.values()))["meta"]
    text = title or (f"Specificity in every context · {meta.get('model')} · {meta.get('data')}\n"
                     "right = the prompt's own answer, wrong = the edit's target_new; "
                     "bars: pooled accuracy, record-clustered bootstrap 95% CI")
    fig = plots.metric_bars(data, text, metrics=[labels[g] for g in contexts])
    fig.update_layout(width=1000, height=520, legend_title_text="")
    fig.update_xaxes(title_text="context (n = records / prompts)")
    return plots.fit_title(fig)
