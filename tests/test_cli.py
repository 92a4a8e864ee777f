import json
import os

import pytest

from attention_drift import cli


@pytest.fixture(scope="module")
def tiny_folder():
    """A saved tiny Llama folder (load_model records the folder it was loaded from)."""
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _evaluate(folder, out, *extra):
    return cli.main(["evaluate", "--model", folder, "--out", str(out), "--no-progress", *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attention-drift: error: ")
    return lines[0]


def test_evaluate_none_then_summarize_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "3", "--batch-size", "4") == 0
    lines = _lines(out)
    assert lines[0]["meta"]["method"] == "none" and lines[0]["meta"]["model"] == tiny_folder
    assert [line["case_id"] for line in lines[1:]] == [0, 1, 2]
    first = lines[1]
    assert "post" not in first and first["edit_seconds"] is None
    assert first["subject"] == "Eiffel Tower" and first["kind"] == "counterfact"
    p_right, p_wrong, correct = first["pre"]["groups"]["efficacy"]["scores"][0]
    assert correct == (p_right > p_wrong)
    capsys.readouterr()

    assert cli.main(["summarize", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"groups", "metrics", "meta"}
    assert result["meta"]["records"] == 3 and result["meta"]["method"] == "none"
    assert result["meta"]["seconds_per_edit"] is None
    eff = result["groups"]["efficacy"]
    assert set(eff) == {"pre"}
    assert set(eff["pre"]) >= {"accuracy", "ci95", "n"} and eff["pre"]["n"] == 3
    assert 0 <= eff["pre"]["ci95"][0] <= eff["pre"]["accuracy"] <= eff["pre"]["ci95"][1] <= 1
    flags = [line["pre"]["groups"]["efficacy"]["scores"][0][2] for line in lines[1:]]
    assert eff["pre"]["accuracy"] == pytest.approx(sum(flags) / 3)
    assert set(result["groups"]) <= set(cli_groups()) and "distract_neighborhood" in result["groups"]
    assert result["meta"]["avg_s"]["pre"] is not None  # both kinds present: all five groups exist

    assert cli.main(["summarize", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| efficacy (ES) | 3 |" in table
    assert f"{100 * eff['pre']['accuracy']:.1f} ± {100 * eff['pre']['half_width']:.1f}" in table


def cli_groups():
    from attention_drift.measure.evaluate import GROUPS

    return list(GROUPS) + ["fluency"]


def test_resume_writes_only_new_records(tiny_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "2") == 0
    before = out.read_text()
    assert _evaluate(tiny_folder, out, "--limit", "4") == 0
    lines = _lines(out)
    assert out.read_text().startswith(before)
    assert len(lines) == 1 + 4
    assert [line["case_id"] for line in lines[1:]] == [0, 1, 2, 3]
    assert _evaluate(tiny_folder, out, "--limit", "4") == 0
    assert len(_lines(out)) == 5


def test_resume_drops_a_torn_last_line(tiny_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "1") == 0
    with out.open("a") as f:
        f.write('{"case_id": 1, "method": "no')
    assert _evaluate(tiny_folder, out, "--limit", "2") == 0
    assert [line.get("case_id") for line in _lines(out)] == [None, 0, 1]


def test_mismatched_run_file_is_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "1") == 0
    before = out.read_text()
    capsys.readouterr()
    assert _evaluate(tiny_folder, out, "--limit", "2", "--fluency") == 1
    assert "fluency" in _error_line(capsys)
    assert out.read_text() == before


def test_post_edit_path_runs_the_real_editor(tiny_folder, tmp_path, capsys):
    """The CLI -> Variant -> editor wiring, with the real ROME on the tiny model's preset."""
    out = tmp_path / "rome.jsonl"
    assert _evaluate(tiny_folder, out, "--method", "rome", "--limit", "2") == 0
    lines = _lines(out)
    assert lines[0]["meta"]["edit"] == {"variant": "rome", "method": "rome", "stats_samples": None, "sadr": None}
    for line in lines[1:]:
        assert line["method"] == "rome" and line["edit_seconds"] > 0 and line["edit_key"]
        pre, post = line["pre"]["groups"], line["post"]["groups"]
        assert pre.keys() == post.keys()
        assert pre["efficacy"]["scores"] != post["efficacy"]["scores"]  # scored inside the edit
    capsys.readouterr()
    assert cli.main(["summarize", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["groups"]["efficacy"]) == {"pre", "post"}
    assert result["meta"]["seconds_per_edit"] == pytest.approx(sum(x["edit_seconds"] for x in lines[1:]) / 2)
    assert _evaluate(tiny_folder, out, "--method", "none", "--limit", "2") == 1
    assert "method" in _error_line(capsys)


def test_suite_is_opt_in_and_reaches_summarize_compare_and_the_figure(tiny_folder, tmp_path, capsys):
    """``evaluate --suite`` scores the distract suite (recorded in the header, refused on resume or
    reuse without it); summarize, compare (paired tests, bootstrap CIs, --json) and the figure read it."""
    from attention_drift.measure.evaluate import BASE_GROUPS, SUITE_GROUPS

    plain, none, rome = tmp_path / "plain.jsonl", tmp_path / "none.jsonl", tmp_path / "rome.jsonl"
    four = ("--limit", "4", "--balanced")
    assert _evaluate(tiny_folder, plain, *four) == 0
    assert _evaluate(tiny_folder, none, *four, "--suite") == 0
    assert _evaluate(tiny_folder, rome, *four, "--suite", "--method", "rome") == 0
    assert "groups" not in _lines(plain)[0]["meta"]
    assert not set(_lines(plain)[1]["pre"]["groups"]) & set(SUITE_GROUPS)
    assert _lines(none)[0]["meta"]["groups"] == list(BASE_GROUPS + SUITE_GROUPS)
    cf, wd = (next(line for line in _lines(rome)[1:] if line["kind"] == kind) for kind in ("counterfact", "wikidata"))
    assert set(cf["pre"]["groups"]) == set(cf["post"]["groups"]) >= set(SUITE_GROUPS) - {"mention_relation"}
    assert "mention_relation" in wd["post"]["groups"]
    assert cf["pre"]["groups"]["neighborhood"].keys() == cf["pre"]["groups"]["mention_neighborhood"].keys()
    assert len(cf["pre"]["groups"]["mention_neighborhood"]["scores"]) == len(cf["pre"]["groups"]["neighborhood"]["scores"])
    capsys.readouterr()
    assert _evaluate(tiny_folder, none, "--limit", "5", "--balanced") == 1
    assert "groups" in _error_line(capsys)
    assert _evaluate(tiny_folder, tmp_path / "x.jsonl", *four, "--suite", "--reuse-pre", str(plain)) == 1
    assert "groups" in _error_line(capsys)

    assert cli.main(["summarize", str(rome), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    for name in SUITE_GROUPS:
        assert set(groups[name]) == {"pre", "post"} and groups[name]["post"]["ci95_bootstrap"] is not None
    assert cli.main(["summarize", str(rome)]) == 0
    assert "| mention_neighborhood (DNS-M) |" in capsys.readouterr().out

    again = tmp_path / "again.jsonl"
    again.write_text(rome.read_text())
    figure = tmp_path / "suite.html"
    assert cli.main(["compare", str(none), str(rome), str(again), "--json", "--suite-figure", str(figure)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["runs"]["rome"]["groups"]) >= set(SUITE_GROUPS)
    paired = result["paired"]["rome -> again"]
    assert set(paired) >= set(SUITE_GROUPS) and paired["mention_neighborhood"]["diff"] == 0
    assert paired["mention_neighborhood"]["n_prompts"] == groups["mention_neighborhood"]["post"]["n"]
    assert figure.is_file() and "DNS-M" in figure.read_text()
    assert cli.main(["compare", str(rome), str(again)]) == 0
    table = capsys.readouterr().out
    assert " mention_neighborhood (DNS-M) |" in table.splitlines()[0]
    assert "| rome -> again | mention_relation |" in table


def test_edit_is_undone_between_records(tiny_folder, tmp_path):
    """Pre-edit scores must not depend on whether the previous record was edited."""
    plain, edited = tmp_path / "none.jsonl", tmp_path / "rome.jsonl"
    assert _evaluate(tiny_folder, plain, "--limit", "3") == 0
    assert _evaluate(tiny_folder, edited, "--method", "rome", "--limit", "3") == 0
    for a, b in zip(_lines(plain)[1:], _lines(edited)[1:]):
        for name, group in a["pre"]["groups"].items():
            for (pr_a, pw_a, c_a), (pr_b, pw_b, c_b) in zip(group["scores"], b["pre"]["groups"][name]["scores"]):
                assert pr_a == pytest.approx(pr_b, rel=1e-4) and pw_a == pytest.approx(pw_b, rel=1e-4)


def test_shards_merge_into_the_unsharded_run(tiny_folder, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert _evaluate(tiny_folder, whole, "--method", "rome", "--limit", "5") == 0
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        assert _evaluate(tiny_folder, part, "--method", "rome", "--limit", "5", "--shard", f"{i}/3") == 0
    sizes = [len(_lines(p)) - 1 for p in parts if p.exists()]
    assert sum(sizes) == 5 and max(sizes) < 5
    merged = tmp_path / "merged.jsonl"
    assert cli.main(["merge", *map(str, parts), "--out", str(merged)]) == 0
    by_id = {line["case_id"]: line for line in _lines(merged)[1:]}
    assert sorted(by_id) == [line["case_id"] for line in _lines(whole)[1:]]
    for line in _lines(whole)[1:]:
        got = by_id[line["case_id"]]["pre"]["groups"]["efficacy"]["scores"][0][:2]
        assert got == pytest.approx(line["pre"]["groups"]["efficacy"]["scores"][0][:2], rel=1e-4)


def test_split_then_merge_keeps_every_record_once(tiny_folder, tmp_path):
    from attention_drift.core.jsonl import merge_runs, read_run, shard_of, split_run

    run = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, run, "--limit", "6") == 0
    parts = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    split_run(run, parts)
    for i, part in enumerate(parts):
        assert all(shard_of(line["case_id"], 2) == i for line in read_run(part).records)
    # a shard resumes: evaluating it again writes nothing new
    assert _evaluate(tiny_folder, parts[0], "--limit", "6", "--shard", "0/2") == 0
    assert merge_runs(run, [run, *parts]) == 6
    assert sorted(line["case_id"] for line in read_run(run).records) == list(range(6))


def test_reuse_pre_copies_scores_and_checks_settings(tiny_folder, tmp_path, capsys):
    plain = tmp_path / "none.jsonl"
    assert _evaluate(tiny_folder, plain, "--limit", "2") == 0
    pre = {line["case_id"]: line["pre"] for line in _lines(plain)[1:]}
    edited = tmp_path / "rome.jsonl"
    assert _evaluate(tiny_folder, edited, "--method", "rome", "--limit", "3", "--reuse-pre", str(plain)) == 0
    lines = _lines(edited)[1:]
    assert [line["pre"] == pre.get(line["case_id"]) for line in lines] == [True, True, False]
    assert "efficacy" in lines[2]["pre"]["groups"]
    capsys.readouterr()
    assert _evaluate(tiny_folder, tmp_path / "fl.jsonl", "--method", "rome", "--limit", "1", "--fluency",
                     "--reuse-pre", str(plain)) == 1
    assert "fluency" in _error_line(capsys)


def test_sadr_flags_become_one_variant(tiny_folder, tmp_path):
    out = tmp_path / "sadr.jsonl"
    assert _evaluate(tiny_folder, out, "--method", "rome", "--limit", "1", "--sadr", "--sadr-weight", "0.5",
                     "--sadr-layers", "lower") == 0
    meta, line = _lines(out)[:2]
    assert meta["meta"]["variant"] == "rome-sadr"
    assert meta["meta"]["edit"]["sadr"]["weight"] == 0.5 and meta["meta"]["edit"]["sadr"]["layers"] == "lower"
    assert line["sadr"]["steps"] >= 1


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only AttentionDriftError is a one-line user error; anything else is a bug and propagates."""
    def broken(self):
        raise RuntimeError("shape mismatch deep inside torch")

    monkeypatch.setattr("attention_drift.runs.evaluation.RecordSelection.load", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["evaluate", "--out", str(tmp_path / "x.jsonl")])


def test_unwritable_out_fails_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("attention_drift.runs.evaluation.ModelHandle.get", lambda self: pytest.fail("loaded a model"))
    monkeypatch.setattr("attention_drift.runs.evaluation.RecordSelection.load", lambda self: pytest.fail("loaded records"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["evaluate", "--out", str(blocker / "x.jsonl")]) == 1
    assert "not a folder" in _error_line(capsys)
    if os.path.isdir("/proc"):  # read-only even for root
        assert cli.main(["evaluate", "--out", "/proc/attention-drift-test/x.jsonl"]) == 1
        assert "cannot write" in _error_line(capsys)


def test_truncated_last_line_is_reported_by_summarize(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "1") == 0
    with out.open("a") as f:
        f.write('{"case_id": 1, "method": "no')
    capsys.readouterr()
    assert cli.main(["summarize", str(out)]) == 0
    assert "cut short" in capsys.readouterr().err


def test_bad_data_path_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["evaluate", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "missing.json" in _error_line(capsys)


def test_bad_record_is_one_clear_line(tmp_path, capsys):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"requested_rewrite": {"prompt": "X is in", "subject": "X"}}]))
    assert cli.main(["evaluate", "--data", str(data), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "record 0" in _error_line(capsys)


def test_unknown_model_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["evaluate", "--model", "no-such-model", "--limit", "1", "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "no-such-model" in _error_line(capsys)
    assert not (tmp_path / "x.jsonl").exists(), "a failed start must not leave a run file that blocks the next run"


@pytest.mark.parametrize("args, needle", [
    (["--balanced"], "--limit"),
    (["--kinds", "counterfact,movies"], "--kinds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "-1"], "--limit"),
    (["--shard", "2/2"], "--shard"),
    (["--shard", "x"], "--shard"),
])
def test_bad_options_are_one_clear_line(tmp_path, capsys, args, needle):
    assert cli.main(["evaluate", "--out", str(tmp_path / "x.jsonl"), *args]) == 1
    assert needle in _error_line(capsys)


def test_summarize_missing_file(tmp_path, capsys):
    assert cli.main(["summarize", str(tmp_path / "none.jsonl")]) == 1
    assert "does not exist" in _error_line(capsys)


def test_unknown_method_and_help(capsys):
    assert cli.main(["evaluate", "--method", "foo"]) == 1
    assert "rome" in _error_line(capsys)
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


def test_models_lists_offline_models(capsys):
    assert cli.main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_default_out_is_file_name_safe(tiny_folder):
    from attention_drift.runs.evaluation import default_out

    assert str(default_out("smollm2-135m", "rome")) == "runs/smollm2-135m-rome.jsonl"
    assert default_out(tiny_folder, "none").name.startswith("attention_drift_tiny_llama_")
    assert default_out("org/some model", "none").name == "org_some_model-none.jsonl"


def test_fluency_in_run_file_and_summary(tiny_folder, tmp_path, capsys):
    out = tmp_path / "fl.jsonl"
    assert _evaluate(tiny_folder, out, "--limit", "2", "--fluency", "--fluency-length", "16") == 0
    lines = _lines(out)
    assert lines[0]["meta"]["fluency"]["max_length"] == 16
    assert len(lines[1]["pre"]["fluency"]["texts"]) == 2 and lines[2]["pre"]["fluency"] is None
    capsys.readouterr()
    assert cli.main(["summarize", str(out), "--json"]) == 0
    fluency = json.loads(capsys.readouterr().out)["groups"]["fluency"]
    entropies = lines[1]["pre"]["fluency"]["ngram_entropy"]
    assert fluency == {"pre": {"ngram_entropy": pytest.approx(sum(entropies) / 2), "n": 2}}
    assert cli.main(["summarize", str(out)]) == 0
    assert f"| fluency (FL, n-gram entropy x100) | 2 | {100 * sum(entropies) / 2:.1f} |" in capsys.readouterr().out


def test_demo_loads_the_model_in_the_dtype_asked(tiny_folder, capsys):
    assert cli.main(["demo", "--model", tiny_folder, "--no-edit", "--dtype", "bfloat16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "(bfloat16)" in out and "Facts the unedited model knows" in out


def test_compare_labels_tell_apart_run_files_of_the_same_name(tmp_path, capsys):
    assert cli.run_labels(["a/rome.jsonl", "b/rome-sadr.jsonl"]) == ["rome", "rome-sadr"]
    assert cli.run_labels(["x/plus/rome-sadr.jsonl", "x/grid/rome-sadr.jsonl", "x/grid/rome.jsonl"]) == [
        "plus/rome-sadr", "grid/rome-sadr", "grid/rome"]
    assert cli.run_labels(["p/q/r.jsonl", "s/q/r.jsonl"]) == ["p/q/r", "s/q/r"]
    run = tmp_path / "rome.jsonl"
    run.write_text(json.dumps({"meta": {"format": "attention_drift.evaluate/2", "model": "m", "method": "rome"}}) + "\n")
    assert cli.main(["compare", str(run), str(run)]) != 0
    assert "the same run file is given twice" in _error_line(capsys)
