"""The command line and the per-record functions the notebooks call give the same numbers.

``attention-drift drift`` / ``patch`` on a saved tiny Llama folder, with a real ROME edit, against
:func:`~attention_drift.measure.drift.drift_record` / :func:`~attention_drift.measure.patch_record.patch_record` (and
:func:`~attention_drift.runs.analysis.dataset_drift`) on the same folder loaded in this process.
``attention_drift.editing.edit`` gets one fixed small configuration on both paths (statistics
from 32 sampled texts, in a private cache) in place of the tiny model's preset.
"""

import json

import pytest

from attention_drift import cli, editing
from attention_drift.core.data import load_example
from attention_drift.measure.drift import drift_record
from attention_drift.runs.analysis import dataset_drift
from attention_drift.editing import ROMEConfig, StatsConfig
from attention_drift.core.models import load_model, tiny_model
from attention_drift.measure.patch_record import patch_record

RECORDS = load_example()[:2]  # Eiffel Tower (neighbourhood prompts), France (relation prompts)
PATCH = ["--top-k", "3", "--window", "2", "--sweep-prompts", "1", "--contamination-prompts", "1"]


@pytest.fixture(scope="module")
def folder():
    return tiny_model("llama").model_name


@pytest.fixture
def rome(monkeypatch, tmp_path):
    """``editing.edit`` with one fixed ROME configuration, whatever the caller resolved."""
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    tiny = ROMEConfig(layer=0, steps=6, context_templates=((4, 2),), weight_decay=0.0,
                      stats=StatsConfig(corpus="model", n_samples=32, seq_len=24))
    real = editing.edit
    calls = []

    def edit(model, requests, method="rome", config=None, sadr=None, **kwargs):
        calls.append(method)
        return real(model, requests, method, tiny, sadr, **kwargs)

    monkeypatch.setattr(editing, "edit", edit)
    return lambda model: (lambda record: real(model, record.rewrite, "rome", tiny)), calls


def _untimed(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("edit_seconds", "method")}


def _run_lines(path) -> list[dict]:
    return [_untimed(json.loads(x)) for x in path.read_text().splitlines()[1:]]


def _same(a, b) -> None:
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_drift_command_equals_drift_record(folder, rome, tmp_path):
    factory_of, calls = rome
    out = tmp_path / "drift"
    assert cli.main(["drift", "--model", folder, "--method", "rome", "--limit", "2", "--out", str(out),
                     "--no-figures", "--no-progress"]) == 0
    assert calls == ["rome", "rome"]
    model = load_model(folder)
    factory = factory_of(model)
    direct = [_untimed(drift_record(model, r, factory).to_line()) for r in RECORDS]
    _same(_run_lines(out / "drift_records.jsonl"), direct)
    report = json.loads((out / "drift.json").read_text())
    notebook = json.loads(json.dumps(dataset_drift(model, RECORDS, factory).to_dict()))
    _same({k: v for k, v in report.items() if k != "meta"}, notebook)
    assert report["n_samples"] == 5 and report["top_heads"][0]["drift"] > 0


def test_patch_command_equals_patch_record(folder, rome, tmp_path):
    factory_of, calls = rome
    out = tmp_path / "patch"
    assert cli.main(["patch", "--model", folder, "--method", "rome", "--limit", "1", "--out", str(out),
                     "--no-figures", "--no-progress", *PATCH]) == 0
    model = load_model(folder)
    direct = patch_record(model, RECORDS[0], factory_of(model), k=3, window=2, sweep_prompts=1,
                          contamination_prompts=1)
    (line,) = _run_lines(out / "patch_records.jsonl")
    _same(line, _untimed(direct.to_line()))
    case = direct.cases[0]
    assert case.pre != case.post and case.recovery("mlp_out_all") == pytest.approx(1.0, abs=1e-3)
    assert direct.head_source == "record" and calls == ["rome"]
