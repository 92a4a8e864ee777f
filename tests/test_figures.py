import json
from pathlib import Path

import pytest

from attention_drift import cli
from attention_drift.runs.figures import (
    ITEMS,
    FiguresConfig,
    FiguresError,
    evaluation_runs,
    figures_markdown,
    CASE_RULE,
    CASE_TIERS,
    pick_case,
    variants,
)
from attention_drift.runs.figure_tables import ablations as _ablations, main_table as _main_table
from attention_drift.core.jsonl import RunFile
from attention_drift.reports.case_pick import CasePickError
from attention_drift.runs.placement import Placement


def _scores(right: list[bool]) -> dict:
    return {"scores": [[0.6 if r else 0.1, 0.1 if r else 0.6, r] for r in right], "skipped": 0}


def _write_run(path, method, posts: dict[str, list[bool]], n_records=4, seconds=1.0):
    """A run file whose every record has the given post-edit correctness per group
    (pre-edit: all wrong for efficacy, all right for the others)."""
    with RunFile(path, {"model": "m", "method": method, "data": "d", "fluency": None, "edit": None}) as run:
        for case_id in range(n_records):
            pre = {g: _scores([g != "efficacy"] * len(v)) for g, v in posts.items()}
            post = {g: _scores(v) for g, v in posts.items()}
            run.write({"case_id": case_id, "kind": "counterfact", "method": method,
                       "pre": {"groups": pre, "fluency": None}, "post": {"groups": post, "fluency": None},
                       "edit_seconds": seconds, "eval_seconds": 2 * seconds})
    return path


def test_config_rejects_bad_requests(tmp_path):
    with pytest.raises(FiguresError, match="unknown items"):
        FiguresConfig(items=("case_study", "heatmaps"))
    with pytest.raises(FiguresError, match="unknown variants"):
        FiguresConfig(variants=("rome-sadr-w5",))
    with pytest.raises(FiguresError, match="drift_limit"):
        FiguresConfig(drift_limit=0)
    with pytest.raises(FiguresError, match="not a folder"):
        FiguresConfig(runs=str(tmp_path / "missing"))


def test_cli_bad_item_is_one_clear_line(capsys):
    assert cli.main(["figures", "--items", "prevalence,nonsense"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown items" in err[0] and "Traceback" not in err[0]


def test_given_runs_are_used_without_evaluating(tmp_path, monkeypatch):
    for name in ("rome", "rome-sadr"):
        _write_run(tmp_path / f"{name}.jsonl", "rome", {"efficacy": [True]})
    monkeypatch.setattr("attention_drift.runs.sweep.run_sweep", lambda *a, **k: pytest.fail(f"evaluated {a}"))
    cfg = FiguresConfig(runs=str(tmp_path), out=str(tmp_path / "out"), variants=("rome", "rome-sadr"))
    here = Placement("m")
    assert evaluation_runs(cfg, ["rome", "rome-sadr"], here) == {
        n: tmp_path / f"{n}.jsonl" for n in ("rome", "rome-sadr")}
    other = tmp_path / "other"
    other.mkdir()
    for name in ("rome", "rome-sadr-plus"):
        _write_run(other / f"{name}.jsonl", "rome", {"efficacy": [True]})
    cfg = FiguresConfig(runs=f"{tmp_path},{other}", out=str(tmp_path / "out"), variants=("rome", "rome-sadr-plus"))
    assert evaluation_runs(cfg, ["rome", "rome-sadr-plus"], here) == {  # the first folder with the file gives it
        "rome": tmp_path / "rome.jsonl", "rome-sadr-plus": other / "rome-sadr-plus.jsonl"}


def test_missing_runs_are_evaluated_with_shared_pre_scores(tmp_path, monkeypatch):
    """One sweep on the placement given: ``none`` first (its pre-edit scores shared), fluency scored."""
    calls = []
    monkeypatch.setattr("attention_drift.runs.sweep.run_sweep", lambda config, where: calls.append((config, where)))
    cfg = FiguresConfig(out=str(tmp_path), limit=3, stats_samples=50)
    placement = Placement("m", workers=2)
    runs = evaluation_runs(cfg, ["rome-sadr-w1"], placement)
    assert runs == {"rome-sadr-w1": tmp_path / "runs" / "rome-sadr-w1.jsonl"}
    [(config, where)] = calls
    none, variant = config.variants
    assert where is placement and config.out == tmp_path / "runs" and config.fluency is not None
    assert (config.selection.limit, config.selection.balanced) == (3, True)
    assert none.method == "none"
    assert variant == variants()["rome-sadr-w1"].__class__("rome-sadr-w1", "rome", variants()["rome-sadr-w1"].sadr, 50)
    assert variant.sadr.weight == 1.0


def test_main_table_numbers_come_from_the_runs(tmp_path, monkeypatch):
    from attention_drift.runs import figure_tables

    titles = []
    save = figure_tables._save
    monkeypatch.setattr(figure_tables, "_save", lambda fig, out, name, png: titles.append(fig.layout.title.text.replace("\u200b<br>", " "))
                        or save(fig, out, name, png))
    groups = {"efficacy": [True], "distract_neighborhood": [True, False, False, False]}
    runs = {"rome": _write_run(tmp_path / "rome.jsonl", "rome", groups, seconds=2.0),
            "rome-sadr": _write_run(tmp_path / "rome-sadr.jsonl", "rome", {**groups, "distract_neighborhood":
                                                                           [True, True, False, False]}, n_records=2)}
    result = _main_table(runs, tmp_path, png=False)
    rows = result["numbers"]["rows"]
    assert rows["pre-edit"]["efficacy"]["accuracy"] == 0.0
    assert rows["rome"]["distract_neighborhood"]["accuracy"] == pytest.approx(0.25)
    assert rows["rome-sadr"]["distract_neighborhood"]["accuracy"] == pytest.approx(0.5)
    assert result["numbers"]["records"] == {"pre-edit": 4, "rome": 4, "rome-sadr": 2}
    assert result["numbers"]["seconds_per_edit"]["rome"] == pytest.approx(2.0)
    assert "| rome | 4 | 100.0 ± 0.0 |" in result["markdown"]
    paired = result["numbers"]["paired"]["rome -> rome-sadr"]["distract_neighborhood"]
    assert paired["n_records"] == 2 and paired["diff"] == pytest.approx(0.25)
    assert result["shared"]["numbers"]["records"]["rome"] == 2  # restricted to the records both runs have
    assert (tmp_path / "main_table.html").is_file()
    assert titles == ["Editors with and without SADR (95% CI) · records pre-edit 4, rome 4, rome-sadr 2; "
                      "records / prompts: ES 2 / 2 or 4 / 4, DNS 2 / 8 or 4 / 16"]
    n = result["n"]["main_table"]
    assert n["records"] == {"pre-edit": 4, "rome": 4, "rome-sadr": 2}
    assert n["prompts"]["rome"] == {"efficacy": 4, "distract_neighborhood": 16}


def test_main_table_pairs_every_other_editor_against_rome(tmp_path):
    groups = {"efficacy": [True], "distract_neighborhood": [True, False]}
    runs = {"rome": _write_run(tmp_path / "rome.jsonl", "rome", groups),
            "memit": _write_run(tmp_path / "memit.jsonl", "memit", {**groups, "distract_neighborhood": [True, True]})}
    paired = _main_table(runs, tmp_path, png=False)["numbers"]["paired"]
    assert list(paired) == ["rome -> memit"]
    assert paired["rome -> memit"]["distract_neighborhood"]["diff"] == pytest.approx(0.5)


def test_weight_sweep_is_ordered_by_weight_on_shared_records(tmp_path):
    runs = {name: _write_run(tmp_path / f"{name}.jsonl", "rome",
                             {"efficacy": [True], "paraphrase": [i < 2], "distract_neighborhood": [i > 0]})
            for i, name in enumerate(("rome", "rome-sadr", "rome-sadr-w1"))}
    assert _ablations(runs, tmp_path, png=False)["not_drawn"] == {"weight": {"records": 4, "needed": 30}}
    assert not list(tmp_path.glob("ablation_*"))  # too few records: listed, not drawn small
    result = _ablations(runs, tmp_path, png=False, min_records=4)
    assert result["weight"]["weights"] == {"rome": 0.0, "rome-sadr": 0.01, "rome-sadr-w1": 1.0}
    rows = result["weight"]["numbers"]["rows"]
    assert [rows[n]["distract_neighborhood"]["accuracy"] for n in ("rome", "rome-sadr", "rome-sadr-w1")] == [0, 1, 1]
    assert "selection" not in result and "layers" not in result  # no ablation variant of either family ran
    assert any(f.endswith("ablation_weight.html") for f in result["files"])


def test_weight_sweep_figure_has_categories_and_intervals(tmp_path, monkeypatch):
    """γ on a categorical axis (plain ROME is "0 (ROME)", not a point at 0.001 on a log axis), with the
    rows' 95% CIs as whiskers."""
    from attention_drift.views import plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, png: drawn.update({path.name: fig}) or [])
    runs = {name: _write_run(tmp_path / f"{name}.jsonl", "rome",
                             {"efficacy": [True], "paraphrase": [i < 2, True], "distract_neighborhood": [i > 0, False]})
            for i, name in enumerate(("rome", "rome-sadr", "rome-sadr-w0.1", "rome-sadr-w1"))}
    result = _ablations(runs, tmp_path, png=False, min_records=4)
    fig = drawn["ablation_weight"]
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.type != "log"
    traces = {t.name: t for t in fig.data}
    assert list(traces["distract neighborhood"].x) == ["0 (ROME)", "0.01 (published)", "0.1", "1"]
    rows = result["weight"]["numbers"]["rows"]
    for i, name in enumerate(("rome", "rome-sadr", "rome-sadr-w0.1", "rome-sadr-w1")):
        entry, trace = rows[name]["distract_neighborhood"], traces["distract neighborhood"]
        assert trace.y[i] == pytest.approx(100 * entry["accuracy"])
        assert trace.error_y.array[i] == pytest.approx(100 * (entry["ci95"][1] - entry["accuracy"]))
        assert trace.error_y.arrayminus[i] == pytest.approx(100 * (entry["accuracy"] - entry["ci95"][0]))
    assert any(v > 0 for v in traces["distract neighborhood"].error_y.array)  # real intervals, not zeros
    assert "95% CI" in fig.layout.title.text


def _sample(prompt, before, after, top1=None, group="distract_neighborhood"):
    """A drift-run sample with (lp_true, lp_new) before and after the edit."""
    return {"case_id": 0, "group": group, "prompt": prompt, "target_true": "x", "factors": {},
            "lp_true_before": before[0], "lp_new_before": before[1], "lp_true_after": after[0],
            "lp_new_after": after[1], "true_top1_before": top1}


def _pick(tmp_path, samples):
    path = tmp_path / "d.jsonl"
    path.unlink(missing_ok=True)
    with RunFile(path, {"format": "x"}) as run:
        run.write({"case_id": 0, "method": "rome", "samples": samples})
    return pick_case(path)


def test_pick_case_follows_the_stated_rule(tmp_path):
    right, wrong = (-1.0, -3.0), (-3.0, -1.0)
    wrong_before_big_drop = _sample("w", wrong, (-9.0, 0.0), top1=False)   # drop 10, but wrong before: never
    failed = _sample("f", right, (-2.0, -1.0), top1=False)                 # drop 3
    failed_more = _sample("F", right, (-3.0, -1.0), top1=False)            # drop 4
    knew_failed = _sample("k", right, (-1.5, -1.0), top1=True)             # drop 2.5, top-1 before
    held = _sample("h", right, (-1.0, -5.0), top1=True)                    # drop -2, still right
    relation = _sample("r", right, (-9.0, 0.0), top1=True, group="distract_relation")
    every = [wrong_before_big_drop, failed, failed_more, knew_failed, held, relation]
    pick = _pick(tmp_path, every)
    assert pick["prompt"] == "k" and pick["pick"]["tier"] == CASE_TIERS[0] and pick["pick"]["rule"] == CASE_RULE
    assert (pick["pick"]["candidates"], pick["pick"]["right_before"], pick["pick"]["prompts"]) == (1, 4, 5)
    pick = _pick(tmp_path, [wrong_before_big_drop, failed, failed_more, held])
    assert pick["prompt"] == "F" and pick["pick"]["tier"] == CASE_TIERS[1] and pick["pick"]["candidates"] == 2
    pick = _pick(tmp_path, [wrong_before_big_drop, held, _sample("h2", right, (-1.0, -2.5))])
    assert pick["prompt"] == "h2" and pick["pick"]["tier"] == CASE_TIERS[2]
    assert _pick(tmp_path, [wrong_before_big_drop, relation]) is None
    assert "right" in CASE_RULE and "largest log-odds" in CASE_RULE


def test_pick_case_excludes_prompts_that_hold_their_true_answer(tmp_path):
    """A true answer copied from the context (the subject 'London ... Festival') is no case study."""
    right = (-1.0, -3.0)
    copied = {**_sample("Where is London Independent Film Festival? It is located in Pasadena. Royal Historical "
                        "Society is located in", right, (-9.0, 0.0), top1=True), "target_true": " london "}
    clean = {**_sample("The headquarters of Green Party is in Seattle. The headquarter of Home Office is in", right,
                       (-2.0, -1.0), top1=True), "target_true": "London"}
    pick = _pick(tmp_path, [copied, clean])
    assert pick["prompt"] == clean["prompt"] and pick["pick"]["tier"] == CASE_TIERS[0]
    assert (pick["pick"]["answer_in_prompt"], pick["pick"]["right_before"], pick["pick"]["prompts"]) == (1, 1, 2)
    assert _pick(tmp_path, [copied]) is None
    assert "does not occur in the prompt itself" in CASE_RULE
    # drift.json's samples (content or path) pick the same prompt as the run file
    content = {"samples": [copied, clean]}
    (tmp_path / "drift.json").write_text(json.dumps(content))
    assert pick_case(content) == pick_case(tmp_path / "drift.json") == pick
    with pytest.raises(CasePickError, match="no 'samples'"):
        pick_case({"records": 3})
    with pytest.raises(CasePickError, match="no drift run file"):
        pick_case(tmp_path / "missing.jsonl")


def _reports(tmp_path, cfg: FiguresConfig, **meta) -> list:
    """drift.json and patch.json of a synthetic run on ``cfg``'s records into ``cfg.out``, with the
    run header ``_analysis`` writes (``meta`` overrides it); returns the records' case ids."""
    from attention_drift.reports.drift import drift_from_lines
    from attention_drift.reports.patch import patch_from_lines
    from attention_drift.runs.evaluation import RecordSelection
    from synthetic_drift import synthetic_run
    from synthetic_patch import synthetic_patch_lines

    ids = [r.case_id for r in RecordSelection(cfg.data, limit=cfg.drift_limit, balanced=True, with_distract=True).load()]
    lines, _ = synthetic_run(n_records=len(ids), prompts_per_record=(3, 3), n_layers=4, n_heads=3,
                             drifting=((2, 1),), pattern_heads=1)
    for line, case_id in zip(lines[1:], ids):
        line["case_id"] = case_id
        for sample in line["samples"]:
            sample["case_id"] = case_id
    header = {"model": "smollm2-135m", "data": "example", "edit": cfg.variant("rome").meta(), **meta}
    out = Path(cfg.out)
    for kind, content in (("drift", drift_from_lines(lines[1:])), ("patch", patch_from_lines(synthetic_patch_lines(ids)))):
        (out / kind).mkdir(parents=True, exist_ok=True)
        (out / kind / f"{kind}.json").write_text(json.dumps({**content, "meta": header}))
    (out / "drift" / "explorer.html").write_text("<html>the committed explorer</html>")
    return ids


def test_reuse_reports_builds_items_from_the_json_without_measuring(tmp_path, monkeypatch):
    import math

    import torch

    from attention_drift.measure.case_study import CaseStudy, HeadChange, Prediction
    from attention_drift.runs import analysis, figures
    from attention_drift.runs.executor import Executor

    cfg = FiguresConfig(out=str(tmp_path), drift_limit=4, patch_limit=4, reuse_reports=True,
                        items=("case_study", "contamination", "drift", "patching"))
    _reports(tmp_path, cfg)
    for name in ("run_drift", "run_patch"):
        monkeypatch.setattr(analysis, name, lambda *a, **k: pytest.fail("measured although reuse_reports"))
    monkeypatch.setattr(figures, "_analysis", lambda *a, **k: pytest.fail("measured although reuse_reports"))
    monkeypatch.setattr("attention_drift.views.plots.png_ok", lambda: False)
    executor = Executor(Placement("smollm2-135m"))
    picked = []

    def one_edit(items, fn):  # the case study's one edit, without a model
        [record] = items
        prompt, true = fn.args[:2]
        picked.append(prompt)

        def state(top, p_true, p_new):
            return Prediction(top, 0.5, p_true, p_new, math.log(p_true / p_new))

        rows = torch.rand(2, 2, 3)
        return [(record, CaseStudy(record.rewrite, prompt, true, record.rewrite.target_new, ("a", "b", "c"), 1,
                                   state(" " + true, 0.4, 0.1), state(" x", 0.1, 0.5), state(" " + true, 0.3, 0.2),
                                   rows, rows.flip(-1), (HeadChange(0, 1, 0.1, 0.5),)))]

    monkeypatch.setattr(executor, "map", one_edit)
    result = figures.run_figures(cfg, executor)
    assert set(result["items"]) == {"case_study", "contamination", "drift", "patching"}
    assert not list(tmp_path.glob("*/*.jsonl"))  # no run file: nothing was measured
    drift_files = result["items"]["drift"]["files"]
    assert str(tmp_path / "drift" / "explorer.html") in drift_files  # kept
    assert (tmp_path / "drift" / "explorer.html").read_text() == "<html>the committed explorer</html>"
    assert str(tmp_path / "drift" / "drift_heatmap.html") in drift_files
    assert any(f.endswith("patch_contamination.html") for f in result["items"]["contamination"]["files"])
    assert "By P(true): the full edit lowers mean P(true) by" in result["items"]["contamination"]["markdown"]
    case = result["items"]["case_study"]
    assert case["numbers"]["prompt"] == picked[0] and "brings the true answer" in case["markdown"]
    assert "## 1. case study" in (tmp_path / "figures.md").read_text()
    assert result["config"]["reuse_reports"] is True


def test_reuse_reports_refuses_missing_or_other_reports(tmp_path, capsys):
    from attention_drift.runs import figures

    here = Placement("smollm2-135m")
    cfg = FiguresConfig(out=str(tmp_path / "none"), items=("drift",), drift_limit=4, reuse_reports=True)
    with pytest.raises(FiguresError, match="drift.json, which is missing"):
        figures.run_figures(cfg, here)
    cfg = FiguresConfig(out=str(tmp_path), items=("patching",), drift_limit=4, patch_limit=4, reuse_reports=True)
    _reports(tmp_path, cfg, model="gpt2-small")
    with pytest.raises(FiguresError, match="model 'gpt2-small' \\(asked: 'smollm2-135m'\\)"):
        figures.run_figures(cfg, here)
    _reports(tmp_path, cfg)
    with pytest.raises(FiguresError, match="records: 4 .*asked 2 \\(patch_limit 2\\)"):
        figures.run_figures(FiguresConfig(out=str(tmp_path), items=("patching",), drift_limit=4, patch_limit=2,
                                          reuse_reports=True), here)
    assert cli.main(["figures", "--out", str(tmp_path / "none"), "--items", "drift", "--reuse-reports"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reuse-reports needs" in err[0] and "missing" in err[0]


def test_markdown_lists_items_in_paper_order(tmp_path):
    written = tmp_path / "f.html"
    written.write_text("<html></html>")
    result = {"config": {}, "items": {"main_table": {"markdown": "T", "files": [str(written), str(tmp_path / "g.png")]},
                                      "case_study": {"markdown": "C", "files": [],
                                                     "n": {"case_study": {"records": 1, "prompts": 1}}}}}
    text = figures_markdown(result)
    assert text.index("## 1. case study") < text.index("## 6. main table") and f"Files: `{written}`\n" in text
    assert "g.png" not in text  # not written (e.g. no PNG export here): not named
    assert "n per figure: case_study: records 1, prompts 1" in text
    assert len(ITEMS) == 7


@pytest.mark.slow
def test_figures_command_end_to_end_on_the_real_model(tmp_path, capsys):
    """Every item from one small real run (drift: one record of each kind; else 1 record; cheap statistics)."""
    out = tmp_path / "figs"
    argv = ["figures", "--out", str(out), "--limit", "1", "--drift-limit", "2", "--patch-limit", "1",
            "--variants", "rome", "--stats-samples", "20", "--no-progress"]
    assert cli.main(argv) == 0
    result = json.loads((out / "figures.json").read_text())
    assert set(result["items"]) == set(ITEMS)
    for item in ("case_study", "prevalence", "drift", "patching", "contamination", "main_table"):
        files = result["items"][item]["files"]
        assert any(f.endswith(".html") for f in files) and all(Path(f).is_file() for f in files)
    case = result["items"]["case_study"]["numbers"]["predictions"]
    assert set(case) == {"pre", "post", "restored"}
    assert "## 6. main table" in (out / "figures.md").read_text()
    before = (out / "figures.json").read_text()
    assert cli.main(argv) == 0  # resumes: nothing recomputed, same numbers
    assert json.loads((out / "figures.json").read_text())["items"] == json.loads(before)["items"]


def test_drift_figure_sizes_count_the_prompts_right_before():
    from attention_drift.reports.drift import drift_from_lines
    from attention_drift.runs.figures import _drift_sizes
    from synthetic_drift import synthetic_run

    lines, _ = synthetic_run(n_records=3, prompts_per_record=(3, 2), n_layers=4, n_heads=3,
                             drifting=((2, 1),), pattern_heads=1)
    lines[1]["samples"][0]["lp_new_before"] = 0.0  # wrong before the edit
    drift = drift_from_lines(lines[1:])
    sizes = _drift_sizes(drift)
    assert sizes["drift_heatmap"] == {"records": 3, "prompts": 8}
    assert sizes["drift_vs_failure"] == {"records": 3, "prompts": 7, "prompts_excluded_wrong_before": 1}


def test_drift_item_records_its_numbers_and_n(tmp_path, monkeypatch):
    """figures.json's drift item: the failure numbers over prompts right before the edit, and n per figure."""
    from attention_drift.runs import figures
    from attention_drift.reports.drift import drift_from_lines
    from synthetic_drift import synthetic_run

    lines, _ = synthetic_run(n_records=3, prompts_per_record=(3, 2), n_layers=4, n_heads=3,
                             drifting=((2, 1),), pattern_heads=1)
    lines[2]["samples"][1]["lp_new_before"] = 0.0

    def analysis(cfg, executor, kind, limit, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "drift.json").write_text(json.dumps(drift_from_lines(lines[1:])))

    monkeypatch.setattr(figures, "_analysis", analysis)
    monkeypatch.setattr("attention_drift.views.plots.png_ok", lambda: False)
    result = figures.run_figures(FiguresConfig(out=str(tmp_path), items=("drift",)), Placement("smollm2-135m"))
    assert list(result["config"]) == ["model", "data", "out", "limit", "drift_limit", "patch_limit", "runs", "items",
                                      "variants", "stats_samples", "device", "dtype", "progress", "workers", "address",
                                      "reuse_reports"]
    assert result["config"]["model"] == "smollm2-135m" and result["config"]["workers"] == 1
    item = result["items"]["drift"]
    assert item["numbers"]["failure"]["all"]["n_excluded_wrong_before"] == 1
    assert {"headline_right_before", "auroc_right_before", "definitions", "wrong_after_rate"} <= set(item["numbers"])
    assert item["n"]["drift_vs_failure"] == {"records": 3, "prompts": 7, "prompts_excluded_wrong_before": 1}
    text = (tmp_path / "figures.md").read_text()
    assert "kept 7 of 8 prompts (1 excluded)" in text
    assert "n per figure: drift_heatmap: records 3, prompts 8; drift_vs_failure: records 3, prompts 7" in text
    assert json.loads((tmp_path / "figures.json").read_text())["items"]["drift"]["n"] == item["n"]


def test_captions_state_the_n_of_each_group_from_the_data(tmp_path, monkeypatch):
    """A group that only some records have (NS / DNS on CounterFact-type records) is captioned
    with its own records / prompts, not the run's record count."""
    from attention_drift.runs import figure_tables

    titles = []
    monkeypatch.setattr(figure_tables, "_save", lambda fig, out, name, png: titles.append(fig.layout.title.text.replace("\u200b<br>", " ")) or [])
    with RunFile(tmp_path / "rome.jsonl", {"model": "m", "method": "rome", "data": "d", "fluency": None,
                                           "edit": None}) as run:
        for case_id in range(5):
            groups = {"efficacy": _scores([True])}
            if case_id < 2:
                groups |= {"neighborhood": _scores([True] * 3), "distract_neighborhood": _scores([False] * 3)}
            run.write({"case_id": case_id, "kind": "counterfact", "method": "rome",
                       "pre": {"groups": groups, "fluency": None}, "post": {"groups": groups, "fluency": None},
                       "edit_seconds": 1.0})
    result = figure_tables.prevalence({"rome": tmp_path / "rome.jsonl"}, tmp_path, png=False)
    assert titles == ["Specificity failure: plain vs distract prompts (95% CI) · 5 records per run; "
                      "records / prompts: NS 2 / 6, DNS 2 / 6"]
    n = result["n"]["prevalence"]
    assert n["group_records"]["rome"] == {"efficacy": 5, "neighborhood": 2, "distract_neighborhood": 2}
    assert n["prompts"]["rome"]["neighborhood"] == 6
    assert "NS 2 / 6, DNS 2 / 6" in result["markdown"]
