import pytest

from attention_drift.core.jsonl import Run
from attention_drift.reports import evaluation as report
from attention_drift.views import plots
from attention_drift.views.suite_plot import suite_figure


def _line(case_id, groups: dict[str, tuple[list[bool], list[bool] | None]]):
    def scores(phase):
        return {"groups": {g: {"scores": [[0.6 if f else 0.1, 0.1 if f else 0.6, f] for f in flags[phase]],
                               "skipped": 0} for g, flags in groups.items() if flags[phase] is not None}}

    line = {"case_id": case_id, "pre": scores(0)}
    if any(flags[1] is not None for flags in groups.values()):
        line["post"] = scores(1)
    return line


def _summaries():
    """none (pre-edit only), rome and rome-sadr on 4 records: NS 3 prompts, DNS 2, DNS-M 2 per record,
    RS-M on 2 records only."""
    def run(post):
        lines = []
        for i in range(4):
            groups = {"neighborhood": ([True] * 3, None if post is None else [True, True, i > 0]),
                      "distract_neighborhood": ([True, i % 2 == 0], None if post is None else [post, False]),
                      "mention_neighborhood": ([True, True], None if post is None else [post, i < 2])}
            if i < 2:
                groups["mention_relation"] = ([True], None if post is None else [post])
            lines.append(_line(i, groups))
        return Run({"model": "tiny", "method": "rome", "data": "dev-report"}, lines)

    return {name: report.summary(run(post)) for name, post in (("none", None), ("rome", False), ("rome-sadr", True))}


def test_suite_figure_draws_pre_edit_and_each_run_with_the_n_of_each_context():
    summaries = _summaries()
    fig = suite_figure(summaries)
    assert [t.name for t in fig.data] == ["pre-edit", "rome", "rome-sadr"]
    ticks = list(fig.data[0].x)
    assert ticks == ["NS<br>4 / 12", "DNS<br>4 / 8", "DNS-M<br>4 / 8", "RS-M<br>2 / 2"]
    rome = dict(zip(fig.data[1].x, fig.data[1].y))
    assert rome["NS<br>4 / 12"] == pytest.approx(100 * 11 / 12)
    assert rome["DNS-M<br>4 / 8"] == pytest.approx(100 * 2 / 8)
    assert dict(zip(fig.data[2].x, fig.data[2].y))["RS-M<br>2 / 2"] == pytest.approx(100.0)
    entry = summaries["rome"]["groups"]["mention_neighborhood"]["post"]
    i = ticks.index("DNS-M<br>4 / 8")
    assert fig.data[1].error_y.array[i] == pytest.approx(100 * (entry["ci95_bootstrap"][1] - entry["accuracy"]))
    assert fig.data[1].error_y.arrayminus[i] == pytest.approx(100 * (entry["accuracy"] - entry["ci95_bootstrap"][0]))
    assert "Specificity in every context" in fig.layout.title.text


def test_suite_figure_needs_a_context():
    only_efficacy = {"run": {"groups": {"efficacy": {"pre": {"accuracy": 1.0, "ci95": [1, 1], "n": 1}}},
                             "meta": {}}}
    with pytest.raises(plots.PlotError, match="--suite"):
        suite_figure(only_efficacy)
