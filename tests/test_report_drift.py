"""Drift vs failure with record-clustered intervals (attention_drift.reports.drift_failure), its
markdown, its forest plot, and the numbers of the committed figures/drift/drift.json."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from attention_drift.reports.drift import drift_from_lines, drift_markdown
from attention_drift.reports.drift_failure import (
    FAILURE_MEASURES,
    HEADLINE_FACTORS,
    failure_links,
    failure_links_markdown,
    max_vs_sum,
    with_failure_links,
)
from attention_drift.reports.stats import correlation_ci
from attention_drift.views import report_figures
from attention_drift.views.plots import PlotError

from synthetic_drift import synthetic_run  # noqa: E402

COMMITTED = Path(__file__).resolve().parents[1] / "figures" / "drift" / "drift.json"
N_BOOT = 400


def _sample(case_id, group, factors, flipped, logodds_drop, p_true_drop, right_before=True):
    return {"case_id": case_id, "group": group, "factors": factors, "flipped": bool(flipped),
            "right_before": right_before, "severity": {"logodds_drop": logodds_drop, "p_true_drop": p_true_drop}}


def _samples(n_records=24, per_record=4, seed=0, signal=1.0):
    """Hand-made samples: failure, log-odds and P(true) drops all grow with a latent drift that the
    max factor sees with little noise and the sum and KL factors with more; a record effect
    shared by its prompts; every fifth prompt wrong before the edit (with wild values)."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    for r in range(n_records):
        shift = rng.normal(0, 0.5)
        for p in range(per_record):
            group = ("distract_neighborhood", "distract_relation")[p % 2]
            z = rng.normal() + shift
            factors = {"max_drift_subject_last": signal * z + rng.normal(0, 0.5),
                       "sum_drift_subject_last": signal * z + rng.normal(0, 1.5),
                       "max_kl": rng.normal()}
            logodds = z + rng.normal(0, 0.7)
            wrong_before = i % 5 == 4
            out.append(_sample(r, group, {k: (50.0 if wrong_before else v) for k, v in factors.items()},
                               logodds > 0.5, logodds, 0.1 * z + rng.normal(0, 0.1), right_before=not wrong_before))
            i += 1
    return out


def _estimates(links):
    for group, g in links["groups"].items():
        for factor, by_measure in g["factors"].items():
            for measure, by_method in by_measure.items():
                for method, e in by_method.items():
                    yield (group, factor, measure, method), e


def test_every_interval_holds_its_estimate_and_counts_prompts_and_records():
    samples = _samples()
    links = failure_links(samples, n_boot=N_BOOT)
    assert list(links["groups"]) == ["all", "distract_neighborhood", "distract_relation"]
    assert links["settings"]["n_boot"] == N_BOOT and set(links["measures"]) == set(FAILURE_MEASURES)
    kept = [s for s in samples if s["right_before"]]
    assert links["groups"]["all"]["n_prompts"] == len(kept) and links["groups"]["all"]["n_records"] == 24
    assert links["groups"]["all"]["n_failed"] == sum(s["flipped"] for s in kept)
    seen = 0
    for key, e in _estimates(links):
        assert e["ci_low"] <= e["value"] <= e["ci_high"], key
        assert e["method"] == "cluster bootstrap" and e["n_boot"] == N_BOOT and e["name"] == key[3]
        assert 0 < e["p_bootstrap"] <= 1 and 0 <= e["p_value"] <= 1
        assert e["n"] == links["groups"][key[0]]["n_prompts"] and e["n_clusters"] <= 24
        seen += 1
    assert seen == 3 * len(HEADLINE_FACTORS) * 3 * 2
    assert links == failure_links(samples, n_boot=N_BOOT), "seeded: the same samples give the same numbers"
    other = failure_links(samples, n_boot=N_BOOT, seed=1)
    assert other["groups"]["all"]["factors"]["max_kl"]["failure"]["pearson"]["ci_low"] != \
        links["groups"]["all"]["factors"]["max_kl"]["failure"]["pearson"]["ci_low"]


def test_point_estimates_are_the_plain_coefficients_of_the_kept_prompts():
    samples = _samples(seed=3)
    links = failure_links(samples, n_boot=50)
    kept = [s for s in samples if s["right_before"] and s["group"] == "distract_relation"]
    x = np.array([s["factors"]["max_drift_subject_last"] for s in kept])
    e = links["groups"]["distract_relation"]["factors"]["max_drift_subject_last"]
    assert e["failure"]["pearson"]["value"] == pytest.approx(np.corrcoef(x, [s["flipped"] for s in kept])[0, 1])
    assert e["p_true_drop"]["pearson"]["value"] == pytest.approx(
        np.corrcoef(x, [s["severity"]["p_true_drop"] for s in kept])[0, 1])
    assert e["logodds_drop"]["pearson"]["value"] == pytest.approx(
        np.corrcoef(x, [s["severity"]["logodds_drop"] for s in kept])[0, 1])


def test_groups_are_computed_on_their_own_prompts():
    samples = _samples(seed=4)
    links = failure_links(samples, n_boot=100)
    relation = [s for s in samples if s["group"] == "distract_relation"]
    alone = failure_links(relation, ["distract_relation"], n_boot=100)
    assert alone["groups"]["all"]["factors"] == alone["groups"]["distract_relation"]["factors"]
    assert links["groups"]["distract_relation"] == alone["groups"]["distract_relation"]
    assert links["groups"]["distract_relation"]["n_prompts"] == sum(s["right_before"] for s in relation)
    assert links["groups"]["all"]["factors"] != links["groups"]["distract_neighborhood"]["factors"]
    assert list(failure_links(samples, ["distract_relation"], n_boot=10)["groups"]) == ["all", "distract_relation"]


def test_the_p_true_drop_measure_is_p_true_not_log_odds():
    rng = np.random.default_rng(5)
    samples = []
    for r in range(12):
        for _ in range(3):
            p_true, logodds = rng.normal(), rng.normal()
            samples.append(_sample(r, "distract_neighborhood", {"max_drift_subject_last": 2 * p_true + 1,
                                                              "sum_drift_subject_last": logodds,
                                                              "max_kl": rng.normal()},
                                   rng.random() < 0.5, logodds, p_true))
    links = failure_links(samples, n_boot=100)["groups"]["all"]["factors"]
    assert links["max_drift_subject_last"]["p_true_drop"]["pearson"]["value"] == pytest.approx(1.0)
    assert links["max_drift_subject_last"]["p_true_drop"]["spearman"]["value"] == pytest.approx(1.0)
    assert links["sum_drift_subject_last"]["logodds_drop"]["pearson"]["value"] == pytest.approx(1.0)
    assert abs(links["max_drift_subject_last"]["logodds_drop"]["pearson"]["value"]) < 0.9
    paired = max_vs_sum(samples, n_boot=100)["groups"]["all"]["comparisons"]
    assert paired["pearson_p_true_drop"]["a"] == pytest.approx(1.0)
    assert paired["pearson_logodds_drop"]["b"] == pytest.approx(1.0)


def test_identical_factors_differ_by_exactly_zero_with_p_one():
    samples = _samples(seed=6)
    for s in samples:
        s["factors"]["sum_drift_subject_last"] = s["factors"]["max_drift_subject_last"]
    paired = max_vs_sum(samples, n_boot=N_BOOT)
    for group, g in paired["groups"].items():
        assert g["verdict"] == "no detectable difference"
        for name, c in g["comparisons"].items():
            assert (c["value"], c["ci_low"], c["ci_high"], c["p_value"]) == (0.0, 0.0, 0.0, 1.0), (group, name)
            assert c["verdict"] == "no detectable difference" and c["a"] == c["b"]


def test_a_perfect_predictor_beats_noise_with_an_interval_excluding_zero():
    rng = np.random.default_rng(7)
    samples = []
    for r in range(30):
        for _ in range(3):
            fails = rng.random() < 0.4
            drop = (1.0 if fails else -1.0) + rng.normal(0, 0.3)
            samples.append(_sample(r, "distract_neighborhood",
                                   {"max_drift_subject_last": float(fails) + 0.01 * rng.random(),
                                    "sum_drift_subject_last": rng.normal(), "max_kl": rng.normal()},
                                   fails, drop, drop / 10))
    g = max_vs_sum(samples, n_boot=N_BOOT)["groups"]["all"]
    auc = g["comparisons"]["auroc_failure"]
    assert auc["a"] == pytest.approx(1.0) and auc["ci_low"] > 0 and auc["p_value"] < 0.01
    r = g["comparisons"]["pearson_failure"]
    assert r["a"] > 0.99 and r["ci_low"] > 0 and r["verdict"] == "max predicts better"
    assert g["verdict"] == "max predicts better"
    swapped = max_vs_sum(samples, pair=("sum_drift_subject_last", "max_drift_subject_last"), n_boot=N_BOOT)
    assert swapped["groups"]["all"]["comparisons"]["auroc_failure"]["verdict"] == "sum predicts better"
    noisy = max_vs_sum(_samples(seed=8, signal=0.0), n_boot=N_BOOT)["groups"]["all"]
    assert {c["verdict"] for c in noisy["comparisons"].values()} <= {"no detectable difference",
                                                                   "max predicts better", "sum predicts better"}
    assert all((c["ci_low"] > 0) == (c["verdict"] == "max predicts better") for c in noisy["comparisons"].values())


def test_the_resampling_unit_is_the_record():
    """Every prompt copied four times within its record: the record-clustered interval does not
    move (the same records are drawn, the pooled r of each draw is unchanged), while resampling
    prompts would take the copies as new evidence and narrow it."""
    samples = [s for s in _samples(n_records=20, per_record=3, seed=9) if s["right_before"]]
    copies = [dict(s) for s in samples for _ in range(4)]
    one = failure_links(samples, n_boot=N_BOOT)["groups"]["all"]["factors"]["max_drift_subject_last"]
    four = failure_links(copies, n_boot=N_BOOT)["groups"]["all"]["factors"]["max_drift_subject_last"]
    for measure in FAILURE_MEASURES:
        a, b = one[measure]["pearson"], four[measure]["pearson"]
        assert b["value"] == pytest.approx(a["value"])
        assert (b["ci_low"], b["ci_high"]) == pytest.approx((a["ci_low"], a["ci_high"]))
        assert b["n"] == 4 * a["n"] and b["n_clusters"] == a["n_clusters"] == 20
        naive = correlation_ci([s["factors"]["max_drift_subject_last"] for s in copies],
                               [float(s["flipped"]) if measure == "failure" else s["severity"][measure]
                                for s in copies], n_boot=N_BOOT)
        assert naive.method == "bootstrap"
        assert naive.ci_high - naive.ci_low < 0.7 * (a["ci_high"] - a["ci_low"]), measure


def test_with_failure_links_adds_keys_and_keeps_the_rest():
    lines, _ = synthetic_run(n_records=6, prompts_per_record=(4,), seed=2, n_layers=4, n_heads=3,
                             drifting=((2, 1), (3, 0)), pattern_heads=1)
    result = drift_from_lines(lines[1:])
    assert {"failure_links", "max_vs_sum"} <= set(result)
    old = {k: v for k, v in result.items() if k not in ("failure_links", "max_vs_sum")}
    refreshed = with_failure_links(old, n_boot=100)
    assert "failure_links" not in old, "the input is not changed"
    assert {k: refreshed[k] for k in old} == old
    assert refreshed["failure_links"]["settings"]["n_boot"] == 100
    assert with_failure_links(old)["failure_links"] == result["failure_links"]
    text = drift_markdown(old)
    assert text == drift_markdown(result), "an older drift.json gets the same tables, computed from its samples"
    assert "| group | factor | coefficient | vs pass/fail | vs log-odds drop | vs P(true) drop | prompts / records |" \
        in text
    e = result["failure_links"]["groups"]["all"]["factors"]["max_kl"]["p_true_drop"]["spearman"]
    row = next(line for line in text.splitlines() if line.startswith("| all | max_kl | Spearman ρ |"))
    assert f"{e['value']:.3f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]" in row
    g = result["max_vs_sum"]["groups"]["all"]
    assert f"Verdict, all: {g['verdict']}." in text
    row = next(line for line in text.splitlines() if line.startswith("| all | AUROC for pass/fail |"))
    c = g["comparisons"]["auroc_failure"]
    assert f"{c['value']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" in row and c["verdict"] in row
    assert failure_links_markdown(result) in text


def _plain(title: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", line) for line in title.split("<br>")]


def test_forest_plot_of_the_links(tmp_path):
    samples = _samples(seed=10)
    result = {"groups": ["distract_neighborhood", "distract_relation"], "samples": samples}
    result = with_failure_links(result, n_boot=200)
    fig = report_figures.drift_failure_links(result)
    assert [a.text for a in fig.layout.annotations] == [
        "Pearson r vs pass/fail (point-biserial)", "Pearson r vs log-odds drop", "Pearson r vs P(true) drop"]
    links = result["failure_links"]["groups"]
    for g, v in links.items():
        assert f"{g} {v['n_prompts']} / {v['n_records']}" in fig.layout.title.text
    assert result["max_vs_sum"]["groups"]["all"]["verdict"] in " ".join(_plain(fig.layout.title.text))
    for line in _plain(fig.layout.title.text):
        assert len(line) * 7 <= fig.layout.width, line
    points = [(t.name, x, y) for t in fig.data for x, y in zip(t.x, t.y)]
    assert len(points) == 3 * 3 * 3
    e = links["distract_relation"]["factors"]["max_kl"]["p_true_drop"]["pearson"]
    trace = next(t for t in fig.data if t.xaxis == "x3" and t.name.startswith("distract_relation ("))
    i = list(trace.y).index("max_kl<br>distract_relation")
    assert trace.x[i] == pytest.approx(e["value"])
    assert trace.error_x.array[i] == pytest.approx(e["ci_high"] - e["value"])
    assert trace.error_x.arrayminus[i] == pytest.approx(e["value"] - e["ci_low"])
    assert report_figures.drift_failure_links({**result, "failure_links": None, "max_vs_sum": None}) is not None
    none_kept = [{**s, "right_before": False} for s in samples]
    assert report_figures.drift_failure_links({"groups": result["groups"], "samples": none_kept}) is None


def test_drift_figures_writes_the_forest_plot(tmp_path):
    lines, _ = synthetic_run(n_records=6, prompts_per_record=(4,), seed=2, n_layers=4, n_heads=3,
                             drifting=((2, 1), (3, 0)), pattern_heads=1)
    written = report_figures.drift_figures(drift_from_lines(lines[1:]), tmp_path, png=False)
    assert str(tmp_path / "drift_failure_links.html") in written
    assert str(tmp_path / "drift_vs_failure.html") in written


def test_the_committed_drift_json_reproduces_its_known_numbers():
    committed = json.loads(COMMITTED.read_text())
    result = with_failure_links(committed, n_boot=200)
    links = result["failure_links"]["groups"]
    m = links["all"]["factors"]["max_drift_subject_last"]
    assert (links["all"]["n_prompts"], links["all"]["n_records"]) == (202, 61)
    assert m["failure"]["pearson"]["value"] == pytest.approx(0.434, abs=5e-4)
    assert m["p_true_drop"]["pearson"]["value"] == pytest.approx(0.080, abs=5e-4)
    assert m["p_true_drop"]["pearson"]["p_value"] == pytest.approx(0.26, abs=5e-3)
    assert m["logodds_drop"]["pearson"]["value"] == pytest.approx(0.355, abs=5e-4)
    rel = links["distract_relation"]["factors"]["max_drift_subject_last"]["logodds_drop"]["pearson"]
    assert rel["value"] == pytest.approx(0.217, abs=5e-4) and rel["ci_low"] < 0 < rel["ci_high"]
    old = committed["correlations_right_before"]
    for group in ("all", "distract_neighborhood", "distract_relation"):
        for factor in HEADLINE_FACTORS:
            for measure, key in (("failure", "failure"), ("logodds_drop", "logodds_drop"),
                                 ("p_true_drop", "p_true_drop")):
                for method in ("pearson", "spearman"):
                    assert links[group]["factors"][factor][measure][method]["value"] == pytest.approx(
                        old[group][factor][key][method]["r"]), (group, factor, measure, method)
    assert result["correlations_right_before"] is committed["correlations_right_before"]
    assert not math.isnan(result["max_vs_sum"]["groups"]["all"]["comparisons"]["auroc_failure"]["value"])


def _small_report(n_records, seed, n_layers=4, n_heads=3, shift=0.0):
    lines, _ = synthetic_run(n_records=n_records, prompts_per_record=(3, 2), seed=seed, n_layers=n_layers,
                             n_heads=n_heads, drifting=((2, 1), (3, 0)), pattern_heads=1, shift=shift)
    return drift_from_lines(lines[1:])


def test_editor_drift_heatmaps_share_one_colour_scale_and_name_each_editors_n():
    reports = {"rome": _small_report(3, seed=1), "alphaedit": _small_report(2, seed=2, shift=0.7)}
    fig = report_figures.editor_drift_heatmaps(reports)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    largest = max(abs(v) for r in reports.values() for row in r["head_stats"]["delta_subject_last"]["mean"]
                  for v in row)
    axis = fig.layout.coloraxis
    assert (axis.cmin, axis.cmax) == (pytest.approx(-largest), pytest.approx(largest))  # centred at 0
    assert [a.text for a in fig.layout.annotations] == ["rome · 3 records / 8 prompts",
                                                        "alphaedit · 2 records / 5 prompts"]
    assert np.allclose(fig.data[1].z, reports["alphaedit"]["head_stats"]["delta_subject_last"]["mean"])
    assert "layer %{y}, head %{x}" in fig.data[0].hovertemplate and "alphaedit" in fig.data[1].hovertemplate


def test_editor_drift_heatmaps_refuse_no_reports_and_different_models():
    with pytest.raises(PlotError, match="no drift reports"):
        report_figures.editor_drift_heatmaps({})
    with pytest.raises(PlotError, match=r"\(layers, heads\) differ"):
        report_figures.editor_drift_heatmaps({"rome": _small_report(2, seed=1),
                                              "ft": _small_report(2, seed=1, n_layers=5)})


def test_drift_figure_draws_drift_runs_from_their_folders(tmp_path, capsys):
    from attention_drift.cli import main

    for name, seed in (("rome", 1), ("alphaedit", 2)):
        report = _small_report(2, seed=seed) | {"meta": {"edit": {"variant": name}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "drift.json").write_text(json.dumps(report))
    out = tmp_path / "editors"
    assert main(["drift-figure", str(tmp_path / "rome"), str(tmp_path / "alphaedit"), "--out", str(out)]) == 0
    page = (tmp_path / "editors.html").read_text().replace("\\u00b7", "·")
    assert "rome · 2 records" in page and "alphaedit · 2 records" in page
    assert main(["drift-figure", str(tmp_path / "rome"), "--labels", "a,b", "--out", str(out)]) == 1
    assert "--labels needs 1 distinct labels" in capsys.readouterr().err
    assert main(["drift-figure", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert "drift.json does not exist: give folders written by 'attention-drift drift'" in capsys.readouterr().err
