"""Sequential editing on the tiny model: checkpoints measured, weights restored bitwise, an
interrupted run resumed with identical numbers, AlphaEdit's state carried, bad input refused
before any edit, the summary and figure built from the lines (evidence runs: SmolLM2, README)."""

import json

import pytest
import torch

from attention_drift.cli import main
from attention_drift.core.data import load_dev
from attention_drift.core.jsonl import read_run
from attention_drift.editing.config import ConfigError
from attention_drift.measure.monitor import MonitorConfig, MonitorError
from attention_drift.reports.sequence import monitor_overhead, sequence_summary
from attention_drift.runs import sequence as seq
from attention_drift.runs.sequence import SequenceConfig, SequenceError, run_sequence, split_records
from attention_drift.runs.variants import Variant
from attention_drift.views.sequence_plot import sequence_figure

FAST = MonitorConfig(every=2, drift_records=2, fluency_records=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def split():
    edits, probes = split_records(load_dev(half="tune"), 2)
    return edits, probes


def _weights(model):
    return [b.mlp.out.weight.detach().clone() for b in model.blocks]


def _numbers(path):
    """The measured numbers of a run file's lines (timings left out)."""
    return [{k: v for k, v in line.items() if k not in ("edit_seconds", "monitor_seconds")}
            for line in read_run(path / seq.RUN_FILE).records]


def test_split_keeps_probes_apart_and_balanced(split):
    edits, probes = split
    assert {p.kind for p in probes} == {"counterfact", "wikidata"}
    assert all(p.neighborhood.prompts or p.relation.prompts for p in probes)
    assert not {e.rewrite.subject for e in edits} & {p.rewrite.subject for p in probes}


def test_a_sequence_is_measured_at_every_checkpoint_and_restored_bitwise(tiny_llama, split, tmp_path, cache):
    edits, probes = split
    before = _weights(tiny_llama)
    config = SequenceConfig(Variant("rome", "rome"), n_edits=4, monitor=FAST)
    summary = run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_llama)))
    lines = read_run(tmp_path / "run" / seq.RUN_FILE).records
    assert [l["edits"] for l in lines] == summary["edits"] == [0, 2, 4]
    assert lines[0]["retention"] is None and lines[0]["drift"] is None
    assert lines[-1]["retention"]["groups"]["efficacy"]["n"] == sum(len(r.efficacy.prompts) for r in edits[:4])
    assert len(lines[-1]["retention"]["efficacy_by_edit"]) == 4
    assert len(lines[1]["edit_seconds"]) == 2 and lines[1]["edits_per_call"] == 1
    # NKL compares with the unedited model: 0 before the first edit, positive after
    assert lines[0]["probes"]["metrics"]["nkl"]["mean"] == 0 and lines[-1]["probes"]["metrics"]["nkl"]["mean"] > 0
    # the first edited records' head drift against the unedited model is non-zero once they are edited
    drift = lines[-1]["drift"]["first"]
    assert drift["records"] >= 1 and len(drift["delta_subject_last"]) == tiny_llama.cfg.n_layers
    assert any(abs(v) > 0 for row in drift["delta_subject_last"] for v in row)
    assert summary["complete"] and monitor_overhead(summary) > 0


def test_the_edits_accumulate(tiny_llama, split, tmp_path, cache):
    """The checkpoint after 4 edits holds the 4 edits' weights: replaying them one after another
    without restoring gives the same tensors."""
    from attention_drift.editing import apply_edit

    edits, probes = split
    config = SequenceConfig(Variant("rome", "rome"), n_edits=4, monitor=MonitorConfig(every=4, drift_records=0,
                                                                                       fluency_records=0))
    run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    saved = torch.load(tmp_path / "run" / seq.CHECKPOINT, weights_only=True)["weights"]
    before = _weights(tiny_llama)
    for record in edits[:4]:
        apply_edit(tiny_llama, record.rewrite, "rome", progress=False)
    for name, tensor in saved.items():
        layer = int(name.split(".")[1])
        assert torch.equal(tensor, tiny_llama.blocks[layer].mlp.out.weight.detach())
    assert not torch.equal(before[int(next(iter(saved)).split(".")[1])], tensor)


@pytest.mark.parametrize("method, batch", [("rome", 1), ("alphaedit", 2)])
def test_an_interrupted_sequence_resumes_with_identical_numbers(tiny_llama, split, tmp_path, cache, monkeypatch,
                                                                method, batch):
    edits, probes = split
    before = _weights(tiny_llama)
    config = SequenceConfig(Variant(method, method), n_edits=4, edit_batch=batch, monitor=FAST)
    whole = run_sequence(tiny_llama, edits, probes, tmp_path / "whole", config, progress=False, figures=False)

    calls = {"n": 0}
    real = seq.apply_edit

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] * batch > 2:  # after the checkpoint at 2 edits, in the last block
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(seq, "apply_edit", dies)
    with pytest.raises(KeyboardInterrupt):
        run_sequence(tiny_llama, edits, probes, tmp_path / "cut", config, progress=False, figures=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_llama)))
    assert [l["edits"] for l in read_run(tmp_path / "cut" / seq.RUN_FILE).records] == [0, 2]
    monkeypatch.setattr(seq, "apply_edit", real)
    resumed = run_sequence(tiny_llama, edits, probes, tmp_path / "cut", config, progress=False, figures=False)
    assert _numbers(tmp_path / "cut") == _numbers(tmp_path / "whole")
    assert resumed["edits"] == whole["edits"] == [0, 2, 4]
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_llama)))
    if method == "alphaedit":
        state = torch.load(tmp_path / "whole" / seq.CHECKPOINT, weights_only=True)["state"]
        assert state["count"] == 4 and set(state["grams"]) == set(config.variant.resolve(tiny_llama)[0].layers)


def test_a_checkpoint_of_another_sequence_is_refused(tiny_llama, split, tmp_path, cache):
    edits, probes = split
    config = SequenceConfig(Variant("rome", "rome"), n_edits=2, monitor=FAST)
    first = run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    lines = (tmp_path / "run" / seq.RUN_FILE).read_text()
    again = run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    assert (tmp_path / "run" / seq.RUN_FILE).read_text() == lines and again["series"] == first["series"]
    # stopped between the last checkpoint and its line: the line is measured again, with its edit times
    (tmp_path / "run" / seq.RUN_FILE).write_text("".join(lines.splitlines(keepends=True)[:-1]))
    run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    redone = read_run(tmp_path / "run" / seq.RUN_FILE).records[-1]
    original = json.loads(lines.splitlines()[-1])
    assert redone["edit_seconds"] == original["edit_seconds"] and len(redone["edit_seconds"]) == 2
    assert _numbers(tmp_path / "run")[-1] == {k: v for k, v in original.items()
                                              if k not in ("edit_seconds", "monitor_seconds")}
    other = SequenceConfig(Variant("rome", "rome"), n_edits=4, monitor=FAST)
    with pytest.raises(SequenceError, match="another sequence"):
        run_sequence(tiny_llama, edits, probes, tmp_path / "run", other, progress=False, figures=False)


def test_bad_requests_are_refused_before_any_edit(split):
    edits, probes = split
    with pytest.raises(ConfigError, match="one fact at a time"):
        SequenceConfig(Variant("rome", "rome"), n_edits=4, edit_batch=2)
    with pytest.raises(SequenceError, match="multiple of edit_batch"):
        SequenceConfig(Variant("memit", "memit"), n_edits=4, edit_batch=3, monitor=FAST)
    with pytest.raises(SequenceError, match="explorer_at"):
        SequenceConfig(Variant("rome", "rome"), n_edits=4, monitor=FAST, explorer_at=(3,))
    with pytest.raises(SequenceError, match="editing method"):
        SequenceConfig(Variant("none"), n_edits=4)
    with pytest.raises(MonitorError, match="every"):
        MonitorConfig(every=0)
    config = SequenceConfig(Variant("rome", "rome"), n_edits=len(edits) + 1, monitor=FAST)
    with pytest.raises(SequenceError, match="only"):
        seq.check_sequence(edits, probes, config)
    with pytest.raises(MonitorError, match="overlaps the edits"):
        seq.check_sequence(edits, [edits[1]], SequenceConfig(Variant("rome", "rome"), n_edits=3, monitor=FAST))


def test_cli_refuses_in_one_line(tmp_path, capsys):
    assert main(["sequence", "--method", "rome", "--edits", "4", "--every", "2", "--edit-batch", "2",
                 "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--edit-batch 2" in err[0]
    assert main(["sequence", "--method", "rome", "--data", "dev-tune", "--edits", "500", "--out",
                 str(tmp_path / "s")]) == 1
    assert "--edits is 500" in capsys.readouterr().err
    assert main(["sequence-figure", str(tmp_path / "nothing"), "--out", str(tmp_path / "f")]) == 1
    assert "sequence.json does not exist" in capsys.readouterr().err


def test_summary_and_figure_follow_the_lines(tiny_llama, split, tmp_path, cache):
    edits, probes = split
    config = SequenceConfig(Variant("rome", "rome"), n_edits=4, monitor=FAST, explorer_at=(4,))
    summary = run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False)
    assert (tmp_path / "run" / "drift-t0004" / "explorer.html").is_file()
    assert (tmp_path / "run" / "sequence.html").is_file()
    again = sequence_summary(read_run(tmp_path / "run" / seq.RUN_FILE))
    assert json.loads(json.dumps(again)) == json.loads((tmp_path / "run" / "sequence.json").read_text())
    es = summary["series"]["efficacy"]["value"]
    assert es[0] is None and es[-1] == again["series"]["efficacy"]["value"][-1]
    fig = sequence_figure({"a": summary, "b": summary})
    names = {t.name for t in fig.data if t.name}
    assert {"a · ES", "b · ES", "a · DNS", "a · first edits"} <= names


def test_cli_and_api_give_the_same_numbers(tiny_llama, tmp_path, cache):
    from attention_drift.core.models import load_model

    folder = tiny_llama.model_name
    args = ["sequence", "--model", folder, "--method", "rome", "--data", "dev-tune", "--edits", "2", "--every", "2",
            "--probes", "2", "--drift-records", "1", "--fluency-records", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    edits, probes = split_records(load_dev(half="tune"), 2)
    config = SequenceConfig(Variant("rome", "rome"), n_edits=2,
                            monitor=MonitorConfig(every=2, drift_records=1, fluency_records=0))
    run_sequence(load_model(folder), edits, probes, tmp_path / "api", config, progress=False, figures=False)
    assert _numbers(tmp_path / "cli") == _numbers(tmp_path / "api")


def test_at_checkpoint_puts_the_last_checkpoint_in_and_restores(tiny_llama, split, tmp_path, cache):
    """Inside ``at_checkpoint`` the model holds the checkpoint's weights and the editor's state after
    them (AlphaEdit's earlier keys), so edits can go on from there; on exit the originals are back."""
    from attention_drift.editing.alphaedit import PreviousKeys

    edits, probes = split
    config = SequenceConfig(Variant("alphaedit", "alphaedit"), n_edits=2, edit_batch=2,
                            monitor=MonitorConfig(every=2, drift_records=0, fluency_records=0))
    run_sequence(tiny_llama, edits, probes, tmp_path / "run", config, progress=False, figures=False)
    saved = torch.load(tmp_path / "run" / seq.CHECKPOINT, weights_only=True)
    before = _weights(tiny_llama)
    with seq.at_checkpoint(tiny_llama, edits, probes, tmp_path / "run", config) as (done, state):
        assert done == 2 and isinstance(state, PreviousKeys)
        for name, tensor in saved["weights"].items():
            layer = int(name.split(".")[1])
            assert torch.equal(tensor, tiny_llama.blocks[layer].mlp.out.weight.detach())
            assert not torch.equal(tensor, before[layer])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(tiny_llama)))
    with pytest.raises(SequenceError, match="no checkpoint.pt"):
        with seq.at_checkpoint(tiny_llama, edits, probes, tmp_path / "elsewhere", config):
            pass


def test_monitor_overhead_leaves_out_blocks_without_edit_times():
    """A block whose edit times a resume lost counts neither its monitoring nor its edits; the
    unedited checkpoint's monitoring always counts."""
    from attention_drift.core.jsonl import Run

    lines = [{"edits": 0, "edit_seconds": [], "monitor_seconds": 10.0},
             {"edits": 2, "edit_seconds": [50.0, 50.0], "monitor_seconds": 20.0},
             {"edits": 4, "edit_seconds": [], "monitor_seconds": 30.0},
             {"edits": 6, "edit_seconds": [40.0, 60.0], "monitor_seconds": 20.0}]
    summary = sequence_summary(Run({"n_edits": 6}, lines))
    assert summary["timing"]["edit_seconds"] == 200.0 and summary["timing"]["monitor_seconds"] == 80.0
    assert monitor_overhead(summary) == pytest.approx((10 + 20 + 20) / 200)
    assert summary["timing"]["seconds_per_edit"] == [50.0, 50.0]
