import json

import pytest

from attention_drift.reports import evaluation as report
from attention_drift.core.jsonl import Run


def _line(case_id, pre: list[bool] | None, post: list[bool], group="distract_neighborhood"):
    def scores(flags):
        return {"groups": {group: {"scores": [[0.6 if f else 0.1, 0.1 if f else 0.6, f] for f in flags],
                                   "skipped": 0}}, "fluency": None}

    line = {"case_id": case_id, "method": "rome", "post": scores(post), "edit_seconds": 1.0}
    if pre is not None:
        line["pre"] = scores(pre)
    return line


def _run(lines) -> Run:
    return Run({"model": "m", "method": "rome"}, list(lines))


def test_paired_difference_counts_and_recovery():
    # 10 records x 4 prompts: pre all right, baseline gets 1 of 4 right, the other run 3 of 4
    base = _run(_line(i, [True] * 4, [True, False, False, False]) for i in range(10))
    better = _run(_line(i, [True] * 4, [True, True, True, False]) for i in range(10))
    d = report.paired_difference(base, better, "distract_neighborhood")
    assert d["n_records"] == 10 and d["n_prompts"] == 40
    assert d["diff"] == pytest.approx(0.5)
    assert d["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]  # identical records: no spread
    assert d["p_value"] == pytest.approx(1 / report.N_BOOTSTRAP)
    assert d["mcnemar_p"] == pytest.approx(2 * 0.5 ** 20)  # 20 discordant prompts, all one way
    assert d["recovered"]["fraction"] == pytest.approx(2 / 3)  # lost 3 of 4, won back 2


def test_paired_difference_without_effect_is_not_significant():
    a = _run(_line(i, None, [i % 2 == 0, True]) for i in range(20))
    b = _run(_line(i, None, [i % 2 == 1, True]) for i in range(20))
    d = report.paired_difference(a, b, "distract_neighborhood")
    assert d["diff"] == 0 and d["p_value"] == 1.0 and d["mcnemar_p"] == 1.0
    assert d["ci95"][0] < 0 < d["ci95"][1]
    assert d["recovered"] is None  # no pre-edit scores


def test_pairs_only_shared_records_with_equal_prompts():
    a = _run([_line(0, None, [True]), _line(1, None, [True]), _line(2, None, [True, True])])
    b = _run([_line(1, None, [False]), _line(2, None, [True]), _line(3, None, [False])])
    d = report.paired_difference(a, b, "distract_neighborhood")
    assert d["n_records"] == 1 and d["diff"] == -1.0  # record 2 has another prompt count: left out


def test_compare_json_has_paired_keys_for_every_pair():
    runs = {name: _run(_line(i, [True] * 2, [i % 3 == k, True]) for i in range(6))
            for k, name in enumerate(("rome", "rome-sadr", "rome-plus"))}
    result = report.compare(runs)
    assert set(result["paired"]) == {"rome -> rome-sadr", "rome -> rome-plus", "rome-sadr -> rome-plus"}
    entry = result["paired"]["rome -> rome-sadr"]["distract_neighborhood"]
    assert {"diff", "ci95", "p_value"} <= set(entry)
    json.dumps(result)
    assert "Paired on shared records" in report.compare_markdown(result)


def test_compare_shows_an_unedited_run_as_the_pre_edit_row_only():
    """A ``--method none`` run has no post-edit scores: no empty row of its own, no empty paired table."""
    unedited = []
    for i in range(6):
        line = _line(i, [True, False], [True, False])
        del line["post"]
        unedited.append(line)
    runs = {"none": Run({"model": "m", "method": "none"}, unedited),
            "rome": _run(_line(i, [True, False], [False, False]) for i in range(6))}
    text = report.compare_markdown(report.compare(runs))
    assert "| pre-edit | 6 | 50.0" in text and "| rome | 6 | 0.0" in text and "| none |" not in text
    assert "No paired tests" in text and "Paired on shared records" not in text
    apart = {"rome": runs["rome"], "memit": _run(_line(i, [True, False], [True, False]) for i in range(6, 9))}
    text = report.compare_markdown(report.compare(apart, shared=False))
    assert "No paired tests" in text and "the runs share no scored records" in text and "--method none" not in text
    runs["rome-sadr"] = _run(_line(i, [True, False], [True, False]) for i in range(6))
    text = report.compare_markdown(report.compare(runs))
    assert "| rome -> rome-sadr | distract_neighborhood | 6 / 12 |" in text and "No paired tests" not in text


def test_a_batch_editing_run_says_its_batch_size_and_that_seconds_are_per_fact():
    lines = [_line(i, [True], [False]) for i in range(4)]
    batched = {"single": _run(lines), "batched": Run({"model": "m", "method": "memit", "edit_batch": 2}, lines)}
    summary = report.summary(batched["batched"])
    assert summary["meta"]["edit_batch"] == 2 and report.summary(batched["single"])["meta"]["edit_batch"] == 1
    assert "batch editing, 2 facts per update · 1.0 s/edit (per fact)" in report.markdown(summary)
    table = report.compare_markdown(report.compare(batched))
    assert "| batched (batches of 2) | 4 |" in table and "| single | 4 |" in table
    assert "| pre-edit | 4 |" in table  # the pre-edit row is not a batch edit


def test_summary_has_both_intervals():
    run = _run(_line(i, [True, False], [i < 5, False]) for i in range(10))
    post = report.summary(run)["groups"]["distract_neighborhood"]["post"]
    assert post["accuracy"] == pytest.approx(0.25)
    lo, hi = post["ci95_bootstrap"]
    assert lo < 0.25 < hi
    assert post["ci95"][0] < 0.25 < post["ci95"][1]
    assert "bootstrap" in report.markdown(report.summary(run))


def _two_groups(case_id, pre, dns, paraphrase):
    line = _line(case_id, pre, dns)
    para = _line(case_id, [True, True], paraphrase, group="paraphrase")
    for phase in ("pre", "post"):
        line[phase]["groups"].update(para[phase]["groups"])
    return line


def test_tradeoff_points_are_recovery_and_paraphrase_cost_against_the_baseline():
    runs = {
        "rome": _run(_two_groups(i, [True] * 4, [True, False, False, False], [True, True]) for i in range(8)),
        "plus": _run(_two_groups(i, [True] * 4, [True, True, True, False], [True, i % 2 == 0]) for i in range(8)),
    }
    (point,) = report.tradeoff(runs, "rome")
    assert point["variant"] == "plus" and point["n_records"] == 8
    assert point["recovered"] == pytest.approx(2 / 3)
    assert point["cost_diff"] == pytest.approx(-0.25)  # 4 of 16 paraphrase prompts lost
    assert point["cost_ci95"][0] <= -0.25 <= point["cost_ci95"][1]
    with pytest.raises(KeyError, match="baseline"):
        report.tradeoff(runs, "memit")


def test_record_bootstrap_is_the_one_of_stats():
    """Summaries and paired differences resample records through ``stats`` (one bootstrap in the
    package): the summary's interval is ``stats.bootstrap_ratio`` of the per-record counts, the
    paired one that of the per-record differences."""
    import numpy as np

    from attention_drift.reports import stats

    a = _run(_line(i, [True] * 3, [i % 2 == 0, i % 3 == 0, True]) for i in range(12))
    b = _run(_line(i, [True] * 3, [True, i % 4 == 0, True]) for i in range(12))
    correct_a = np.array([sum([i % 2 == 0, i % 3 == 0, True]) for i in range(12)], dtype=float)
    correct_b = np.array([sum([True, i % 4 == 0, True]) for i in range(12)], dtype=float)
    prompts = np.full(12, 3.0)
    post = report.summary(a)["groups"]["distract_neighborhood"]["post"]
    expected = stats.bootstrap_ratio(correct_a, prompts)
    assert post["ci95_bootstrap"] == pytest.approx([expected.ci_low, expected.ci_high])
    d = report.paired_difference(a, b, "distract_neighborhood")
    paired = stats.bootstrap_ratio(correct_b - correct_a, prompts)
    assert d["ci95"] == pytest.approx([paired.ci_low, paired.ci_high])
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]


def test_suite_groups_are_summarized_paired_and_tabled():
    """A suite group in the run lines reaches the summary (both intervals), the paired tests and the
    table's columns and sizes, with no list of groups passed anywhere."""
    def line(case_id, dns, mention):
        out = _line(case_id, [True, True], dns)
        extra = _line(case_id, [True, True], mention, group="mention_neighborhood")
        for phase in ("pre", "post"):
            out[phase]["groups"].update(extra[phase]["groups"])
        return out

    rome = _run(line(i, [True, False], [i % 2 == 0, False]) for i in range(8))
    plus = _run(line(i, [True, True], [True, i % 2 == 0]) for i in range(8))
    entry = report.summary(rome)["groups"]["mention_neighborhood"]["post"]
    assert entry["accuracy"] == pytest.approx(0.25) and entry["n"] == 16 and entry["n_records"] == 8
    assert entry["ci95_bootstrap"][0] < 0.25 < entry["ci95_bootstrap"][1]
    result = report.compare({"rome": rome, "plus": plus})
    paired = result["paired"]["rome -> plus"]["mention_neighborhood"]
    assert paired["diff"] == pytest.approx(0.5) and paired["n_prompts"] == 16
    assert paired["recovered"]["fraction"] == pytest.approx(8 / 12)
    table = report.compare_markdown(result)
    assert "| distract_neighborhood (DNS) | mention_neighborhood (DNS-M) |" in table.splitlines()[0]
    assert "DNS-M 8 / 16" in table and "| rome -> plus | mention_neighborhood | 8 / 16 | +50.0 |" in table
    assert "restated_neighborhood" not in table  # a suite group no run has is left out
