"""Batch editing in evaluation runs (``evaluate_run(..., edit_batch=B)``, ``evaluate --edit-batch``)
with the tiny random Llama: one edit per chunk of B records, each record scored inside it."""

import json

import pytest
import torch

from attention_drift import cli
from attention_drift.core.jsonl import RunFileError, read_run
from attention_drift.runs import evaluation as runs
from attention_drift.runs.evaluation import ModelHandle, RecordSelection
from attention_drift.runs.placement import Placement
from attention_drift.runs.variants import SADRSpec, Variant

MEMIT = Variant("memit", "memit")
SELECTION = RecordSelection(limit=4)
TIMINGS = ("edit_seconds", "eval_seconds", "batch_edit_seconds")


@pytest.fixture(scope="module")
def tiny_folder():
    from attention_drift.core.models import tiny_model

    return tiny_model("llama").model_name


@pytest.fixture
def model(tiny_folder):
    from attention_drift.core.models import load_model

    return load_model(tiny_folder)


def _run(model, out, edit_batch, variant=MEMIT, records=None):
    records = SELECTION.load() if records is None else records
    meta = runs.run_meta(model.model_name, variant, SELECTION, None, edit_batch=edit_batch)
    handle = ModelHandle(Placement(model.model_name), model=model)
    return runs.evaluate_run(handle, records, variant, out, meta, progress=False, edit_batch=edit_batch)


def _untimed(line):
    return {k: v for k, v in line.items() if k not in TIMINGS}


def _manual_posts(model, records, variant=MEMIT):
    """Each record's post-edit scores inside one hand-made edit of all their requests."""
    from attention_drift.editing import edit
    from attention_drift.measure.evaluate import evaluate_record

    pre = [evaluate_record(model, r, fluency=False) for r in records]
    config, sadr = variant.resolve(model)
    with edit(model, [r.rewrite for r in records], variant.method, config, sadr, progress=False) as result:
        posts = [json.loads(json.dumps(evaluate_record(model, r, fluency=False, pre=p).to_json()))
                 for r, p in zip(records, pre)]
    return posts, result


def test_batch_lines_equal_scoring_inside_one_manual_edit(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = _run(model, tmp_path / "b2.jsonl", 2)
    assert (outcome.written, outcome.skipped) == (4, 0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} not restored bitwise"

    run = read_run(tmp_path / "b2.jsonl")
    assert run.meta["edit_batch"] == 2
    records = SELECTION.load()
    assert [line["case_id"] for line in run.records] == [r.case_id for r in records]
    for n, line in enumerate(run.records):
        chunk = [r.case_id for r in records[2 * (n // 2): 2 * (n // 2) + 2]]
        assert line["edit_batch"] == {"size": 2, "index": n // 2, "case_ids": chunk}
        assert line["edit_seconds"] == pytest.approx(line["batch_edit_seconds"] / 2)
        assert line["eval_seconds"] > line["edit_seconds"] > 0

    for index in (0, 1):
        posts, _ = _manual_posts(model, records[2 * index: 2 * index + 2])
        assert [line["post"] for line in run.records[2 * index: 2 * index + 2]] == posts

    _run(model, tmp_path / "b1.jsonl", 1)
    single = read_run(tmp_path / "b1.jsonl")
    assert "edit_batch" not in single.meta and all("edit_batch" not in line for line in single.records)
    assert [line["pre"] for line in single.records] == [line["pre"] for line in run.records]
    assert [line["post"] for line in single.records] != [line["post"] for line in run.records]


def test_last_chunk_may_be_smaller(model, tmp_path):
    _run(model, tmp_path / "b3.jsonl", 3)
    lines = read_run(tmp_path / "b3.jsonl").records
    ids = [r.case_id for r in SELECTION.load()]
    assert [line["edit_batch"] for line in lines] == [{"size": 3, "index": 0, "case_ids": ids[:3]}] * 3 + [
        {"size": 3, "index": 1, "case_ids": ids[3:]}]
    assert lines[3]["edit_seconds"] == lines[3]["batch_edit_seconds"]


def test_an_interrupted_chunk_is_edited_whole_and_only_its_missing_lines_written(model, tmp_path):
    whole = tmp_path / "whole.jsonl"
    _run(model, whole, 2)
    header, first, second, *rest = whole.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text(header + first + "".join(rest))  # the second record of chunk 0 is missing
    before = cut.read_text()

    outcome = _run(model, cut, 2)
    assert (outcome.written, outcome.skipped) == (1, 3)
    assert cut.read_text().startswith(before)
    added = read_run(cut).records[-1]
    assert _untimed(added) == _untimed(json.loads(second))  # scored inside the edit of records 0 and 1
    assert _run(model, cut, 2).written == 0


def test_reused_pre_reads_nkl_distributions_before_the_batch_edit(model, tmp_path):
    """With pre-edit scores reused from a ``none`` run, NKL's pre-edit distributions are read before
    the chunk's edit: the post-edit NKL equals that of the run that scored pre-edit itself."""
    records = [r for r in SELECTION.load() if r.kind == "counterfact"][:2]  # with neighbourhood prompts
    none = Variant("none")
    plain = tmp_path / "none.jsonl"
    runs.evaluate_run(ModelHandle(Placement(model.model_name), model=model), records, none, plain,
                      runs.run_meta(model.model_name, none, SELECTION, None), progress=False)
    _run(model, tmp_path / "direct.jsonl", 2, records=records)
    meta = runs.run_meta(model.model_name, MEMIT, SELECTION, None, edit_batch=2)
    runs.evaluate_run(ModelHandle(Placement(model.model_name), model=model), records, MEMIT,
                      tmp_path / "reused.jsonl", meta, reuse_pre=plain, progress=False, edit_batch=2)
    direct, reused = (read_run(tmp_path / f"{name}.jsonl").records for name in ("direct", "reused"))
    for a, b in zip(direct, reused):
        nkl = a["post"]["metrics"]["nkl"]["values"]
        assert nkl and max(nkl) > 0
        assert b["post"]["metrics"]["nkl"]["values"] == pytest.approx(nkl, rel=1e-4, abs=1e-9)


def test_another_edit_batch_does_not_resume_the_file(model, tmp_path):
    out = tmp_path / "b2.jsonl"
    _run(model, out, 2, records=SELECTION.load()[:2])
    with pytest.raises(RunFileError, match="edit_batch"):
        _run(model, out, 1)
    with pytest.raises(RunFileError, match="edit_batch"):
        _run(model, out, 4)
    assert "edit_batch" not in runs.run_meta("m", MEMIT, SELECTION, None)  # single-edit headers as before


def test_sadr_lines_carry_their_own_request_trace(model):
    """MEMIT at layer 0 and SADR on layer 1, so each request's SADR loss and heads differ."""
    import dataclasses

    from attention_drift.editing import edit

    variant = Variant("memit-sadr", "memit", SADRSpec(steps=3, layers=(1,), weight=1.0))
    config, sadr = variant.resolve(model)
    resolved = (dataclasses.replace(config, layers=(0,)), sadr)
    records = SELECTION.load()[:2]
    lines = runs.evaluate_lines(model, records, variant, resolved, batch=(2, 0))
    with edit(model, [r.rewrite for r in records], "memit", *resolved, progress=False) as result:
        pass
    expected = [{"loss": trace["loss"][-1], "steps": t.steps_run, "selected_heads": int(trace["mask"][-1].sum())}
                for trace, t in zip(result.sadr_records, result.traces)]
    assert expected[0] != expected[1]
    assert [line["sadr"] for line in lines] == expected


@pytest.mark.parametrize("method, size", [("rome", 2), ("memit", 0), ("none", 2)])
def test_api_refuses_a_batch_the_editor_cannot_make_before_loading(method, size, tmp_path):
    from attention_drift.core.errors import AttentionDriftError

    def no_model():
        pytest.fail("loaded a model")

    variant = Variant(method, method)
    meta = runs.run_meta("m", variant, SELECTION, None, edit_batch=size)
    handle = ModelHandle(Placement("m"))
    handle.get = no_model
    with pytest.raises(AttentionDriftError, match="edit_batch"):
        runs.evaluate_run(handle, SELECTION.load(), variant, tmp_path / "x.jsonl", meta, edit_batch=size)
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "rome", "--edit-batch", "2"], "rome edits one fact at a time"),
    (["--method", "memit", "--edit-batch", "0"], "--edit-batch must be an integer >= 1"),
    (["--edit-batch", "2"], "needs a batch editing method"),
])
def test_cli_refuses_in_one_line_before_loading(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("attention_drift.runs.evaluation.ModelHandle.get", lambda self: pytest.fail("loaded a model"))
    monkeypatch.setattr("attention_drift.runs.evaluation.RecordSelection.load", lambda self: pytest.fail("loaded records"))
    assert cli.main(["evaluate", "--out", str(tmp_path / "x.jsonl"), *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attention-drift: error: ")
    assert needle in lines[0] and "--edit-batch" in lines[0] and "edit_batch" not in lines[0]
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_edit_batch_writes_batch_lines(tiny_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    assert cli.main(["evaluate", "--model", tiny_folder, "--method", "memit", "--edit-batch", "2", "--limit", "3",
                     "--out", str(out), "--no-progress"]) == 0
    run = read_run(out)
    assert run.meta["edit_batch"] == 2
    assert [(line["edit_batch"]["index"], len(line["edit_batch"]["case_ids"])) for line in run.records] == [
        (0, 2), (0, 2), (1, 1)]
    assert cli.main(["evaluate", "--model", tiny_folder, "--method", "memit", "--limit", "3",
                     "--out", str(out), "--no-progress"]) == 1
