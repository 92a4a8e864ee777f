import json
from pathlib import Path

import pytest

from attention_drift import cli
from attention_drift.figures import (
    ITEMS,
    FiguresConfig,
    FiguresError,
    _ablations,
    _main_table,
    evaluation_runs,
    figures_markdown,
    pick_case,
    variants,
)
from attention_drift.jsonl import RunFile


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
    monkeypatch.setattr("attention_drift.runs.evaluate_run", lambda *a, **k: pytest.fail(f"evaluated {a}"))
    cfg = FiguresConfig(runs=str(tmp_path), out=str(tmp_path / "out"), variants=("rome", "rome-sadr"))
    assert evaluation_runs(cfg, ["rome", "rome-sadr"]) == {n: tmp_path / f"{n}.jsonl" for n in ("rome", "rome-sadr")}


def test_missing_runs_are_evaluated_with_shared_pre_scores(tmp_path, monkeypatch):
    calls = []

    def record(handle, records, variant, out, meta, **options):
        calls.append((variant, out, options, len(records)))

    monkeypatch.setattr("attention_drift.runs.evaluate_run", record)
    cfg = FiguresConfig(out=str(tmp_path), limit=3, stats_samples=50)
    runs = evaluation_runs(cfg, ["rome-sadr-w1"])
    assert runs == {"rome-sadr-w1": tmp_path / "runs" / "rome-sadr-w1.jsonl"}
    (none, _, first, n), (variant, out, second, _) = calls
    assert none.method == "none" and first["reuse_pre"] is None and n == 3
    assert variant == variants()["rome-sadr-w1"].__class__("rome-sadr-w1", "rome", variants()["rome-sadr-w1"].sadr, 50)
    assert variant.sadr.weight == 1.0 and second["reuse_pre"] == tmp_path / "runs" / "none.jsonl"


def test_main_table_numbers_come_from_the_runs(tmp_path):
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


def test_weight_sweep_is_ordered_by_weight_on_shared_records(tmp_path):
    runs = {name: _write_run(tmp_path / f"{name}.jsonl", "rome",
                             {"efficacy": [True], "paraphrase": [i < 2], "distract_neighborhood": [i > 0]})
            for i, name in enumerate(("rome", "rome-sadr", "rome-sadr-w1"))}
    result = _ablations(runs, tmp_path, png=False)
    assert result["weight"]["weights"] == {"rome": 0.0, "rome-sadr": 0.01, "rome-sadr-w1": 1.0}
    rows = result["weight"]["numbers"]["rows"]
    assert [rows[n]["distract_neighborhood"]["accuracy"] for n in ("rome", "rome-sadr", "rome-sadr-w1")] == [0, 1, 1]
    assert "selection" not in result and "layers" not in result  # no ablation variant of either family ran
    assert any(f.endswith("ablation_weight.html") for f in result["files"])


def test_pick_case_prefers_the_biggest_flip(tmp_path):
    def sample(prompt, flipped, drop, group="distract_neighborhood"):
        return {"group": group, "prompt": prompt, "target_true": "x", "flipped": flipped,
                "severity": {"logodds_drop": drop}}

    with RunFile(tmp_path / "d.jsonl", {"format": "x"}) as run:
        run.write({"case_id": 0, "method": "rome", "samples": [sample("a", False, 9.0), sample("b", True, 2.0)]})
        run.write({"case_id": 1, "method": "rome", "samples": [sample("c", True, 3.0),
                                                                 sample("d", True, 8.0, "distract_relation")]})
    assert pick_case(tmp_path / "d.jsonl")["prompt"] == "c"


def test_markdown_lists_items_in_paper_order():
    result = {"config": {}, "items": {"main_table": {"markdown": "T", "files": ["f.html"]},
                                      "case_study": {"markdown": "C", "files": []}}}
    text = figures_markdown(result)
    assert text.index("## 1. case study") < text.index("## 6. main table") and "`f.html`" in text
    assert len(ITEMS) == 7


@pytest.mark.slow
def test_figures_command_end_to_end_on_the_real_model(tmp_path, capsys):
    """Every item from one small real run (1 record each, cheap statistics)."""
    out = tmp_path / "figs"
    argv = ["figures", "--out", str(out), "--limit", "1", "--drift-limit", "1", "--patch-limit", "1",
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
