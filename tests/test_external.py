"""Edits made elsewhere (attention_drift.editing.external): a pair of models, a Hugging Face folder,
a saved edit and a PEFT adapter all go through the in-process edit's drift path; bad sources give
one clear line; EditResult.save_pretrained round-trips."""

import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from attention_drift import cli
from attention_drift.core.data import load_example
from attention_drift.core.models import hf_parameters, load_model, tiny_model
from attention_drift.editing import ROMEConfig, StatsConfig, apply_edit, edit
from attention_drift.editing.external import ExternalEditError, WeightSwap, load_edited
from attention_drift.measure.drift import HEAD_KEYS, drift_record
from attention_drift.runs.analysis import dataset_drift, drift_pair

sys.path.insert(0, os.path.dirname(__file__))
from handmade_edit import push_subject  # noqa: E402

RECORDS = load_example()


def _state(model):
    return {n: p.detach().clone() for n, p in hf_parameters(model).items()}


def _same_state(model, state):
    return all(torch.equal(p, state[n]) for n, p in hf_parameters(model).items())


def _edited_copy(model, record):
    """A second model holding ``record``'s hand-made edit for good."""
    after = copy.deepcopy(model)
    with push_subject(after, record.rewrite):
        edited = _state(after)
    with torch.no_grad():
        for name, param in hf_parameters(after).items():
            param.copy_(edited[name])
    return after


def _same_heads(a, b):
    for key in HEAD_KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert json.dumps([s.to_dict() for s in a.samples]) == json.dumps([s.to_dict() for s in b.samples])


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    return StatsConfig(corpus="model", n_samples=32, seq_len=24)


def _rome(corpus):
    return ROMEConfig(layer=1, stats=corpus, steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0)


def test_drift_pair_equals_the_in_process_edit(model):
    record = RECORDS[0]
    original = _state(model)
    in_process = drift_record(model, record, lambda r: push_subject(model, r.rewrite))
    after = _edited_copy(model, record)
    swap = load_edited(model, after)
    assert swap.names == (("model.layers.0.mlp.down_proj.weight",) if "llama" in type(model.original_model).__name__.lower()
                          else ("transformer.h.0.mlp.c_proj.weight",))
    paired = drift_record(model, record, swap)
    _same_heads(in_process, paired)
    assert _same_state(model, original)  # restored bitwise

    report = drift_pair(model, after, [record]).to_dict()
    expected = dataset_drift(model, [record], lambda r: push_subject(model, r.rewrite)).to_dict()
    assert json.dumps(report, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)
    assert _same_state(model, original)


def test_swap_restores_on_error_and_refuses_nesting(tiny_llama):
    original = _state(tiny_llama)
    swap = load_edited(tiny_llama, _edited_copy(tiny_llama, RECORDS[0]))
    with pytest.raises(RuntimeError):
        with swap:
            assert not _same_state(tiny_llama, original)
            with pytest.raises(ExternalEditError, match="already applied"):
                swap.__enter__()
            raise RuntimeError("inside")
    assert _same_state(tiny_llama, original)
    assert swap(RECORDS[1]) is swap


def test_saved_edit_and_its_folder_give_the_in_process_drift(corpus, tmp_path, tiny_llama):
    record = RECORDS[0]
    original = _state(tiny_llama)
    result = apply_edit(tiny_llama, record.rewrite, "rome", _rome(corpus), progress=False)
    edited = _state(tiny_llama)
    result.restore()
    in_process = drift_record(tiny_llama, record, lambda r: result)

    path = result.save(tmp_path / "edit.pt")
    folder = result.save_pretrained(tmp_path / "edited")
    assert result.restored and _same_state(tiny_llama, original)  # applied only for the saving
    for source in (path, folder):
        swap = load_edited(tiny_llama, source)
        assert swap.names == ("model.layers.1.mlp.down_proj.weight",)
        _same_heads(in_process, drift_record(tiny_llama, record, swap))
        assert _same_state(tiny_llama, original)

    # the folder is a plain Hugging Face model holding the edited weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(p, edited[n]) for n, p in hf.named_parameters())
    reloaded = load_model(folder)
    assert _same_state(reloaded, edited)
    assert reloaded.cfg.default_prepend_bos == tiny_llama.cfg.default_prepend_bos
    text = "The Eiffel Tower is in Paris"
    assert reloaded.tokenizer(text)["input_ids"] == tiny_llama.tokenizer(text)["input_ids"]


def test_save_pretrained_keeps_an_applied_edit_applied(corpus, tmp_path, tiny_gpt2):
    with edit(tiny_gpt2, RECORDS[0].rewrite, "rome", _rome(corpus), progress=False) as result:
        edited = _state(tiny_gpt2)
        result.save_pretrained(tmp_path / "gpt2-edited")
        assert _same_state(tiny_gpt2, edited)
    assert _same_state(load_model(tmp_path / "gpt2-edited"), edited)


def _adapter(base_folder, out, *, seed=0, targets=("q_proj", "v_proj")):
    """A tiny LoRA adapter (random, non-zero B) made with peft on the Hugging Face model in ``base_folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(out)
    merged = {n: p.detach().clone() for n, p in peft_model.merge_and_unload().named_parameters()}
    return Path(out), merged


def test_lora_adapter_runs_end_to_end_through_the_cli(tmp_path, tiny_llama):
    base = Path(tiny_llama.original_model.config._name_or_path)
    adapter, merged = _adapter(base, tmp_path / "adapter")
    original = _state(tiny_llama)
    swap = load_edited(tiny_llama, adapter)
    assert set(swap.names) == {f"model.layers.{l}.self_attn.{m}_proj.weight" for l in (0, 1) for m in "qv"}
    assert all(torch.equal(t, merged[n]) for n, t in swap.weights.items())
    assert _same_state(tiny_llama, original)  # the merge never wrote the model's own tensors

    out = tmp_path / "run"
    assert cli.main(["drift", "--model", str(base), "--edited", str(adapter), "--limit", "2", "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0
    data = json.loads((out / "drift.json").read_text())
    assert data["meta"]["edit"]["edited"] == str(adapter) and data["n_samples"] > 0
    assert (out / "explorer.html").is_file() and data["top_heads"]
    lines = [json.loads(l) for l in (out / "drift_records.jsonl").read_text().splitlines()]
    assert {l.get("method") for l in lines if "case_id" in l} == {"edited-adapter"}
    # the attention itself moved: the adapter changes q and v of both layers
    assert any(abs(v) > 0 for row in lines[-1]["heads"]["kl"][0] for v in row)


def _error_line(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if "error" in l.lower() or "Traceback" in l]
    assert len(errors) == 1 and err[-1] == errors[0] and errors[0].startswith("attention-drift: error: "), err
    return errors[0]


def test_bad_sources_give_one_clear_line(corpus, tmp_path, capsys, tiny_llama):
    base = str(tiny_llama.original_model.config._name_or_path)
    drift = ["drift", "--model", base, "--limit", "1", "--no-progress", "--out", str(tmp_path / "run")]

    line = _error_line(capsys, [*drift, "--edited", str(tmp_path / "missing")])
    assert "--edited" in line and "does not exist" in line

    deeper = tiny_model("llama", n_layers=3)
    folder = tmp_path / "deeper"
    deeper.original_model.config._name_or_path = ""
    from attention_drift.core.models import save_hf_folder

    save_hf_folder(deeper, folder)
    assert "another architecture" in _error_line(capsys, [*drift, "--edited", str(folder)])
    with pytest.raises(ExternalEditError, match="n_layers 3 != 2") as err:
        load_edited(tiny_llama, folder)
    assert err.value.fields == ("edited",)
    with pytest.raises(ExternalEditError, match="another architecture"):
        load_edited(tiny_llama, tiny_model("gpt2"))

    same = tmp_path / "same"
    save_hf_folder(tiny_llama, same)
    assert "same weights" in _error_line(capsys, [*drift, "--edited", str(same)])

    other_vocab = tmp_path / "vocab"
    save_hf_folder(tiny_llama, other_vocab)
    vocab = json.loads((other_vocab / "tokenizer.json").read_text())
    first = next(iter(vocab["model"]["vocab"]))
    vocab["model"]["vocab"][first + "x"] = vocab["model"]["vocab"].pop(first)
    (other_vocab / "tokenizer.json").write_text(json.dumps(vocab))
    assert "another vocabulary" in _error_line(capsys, [*drift, "--edited", str(other_vocab)])

    # an adapter made on a model of other shapes / another name
    wide_folder = tmp_path / "wide"
    wide = tiny_model("llama", n_layers=2, seed=1)
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**wide.original_model.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    hf = AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(wide_folder)
    adapter, _ = _adapter(wide_folder, tmp_path / "wide-adapter")
    line = _error_line(capsys, [*drift, "--edited", str(adapter)])
    assert "base model" in line
    with pytest.raises(ExternalEditError, match="model's weight is"):
        load_edited(tiny_llama, adapter, allow_other_base=True)
    renamed, _ = _adapter(base, tmp_path / "renamed")
    config_path = renamed / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    config_path.write_text(json.dumps(config))
    assert "another-model" in _error_line(capsys, [*drift, "--edited", str(renamed)])
    assert load_edited(tiny_llama, renamed, allow_other_base=True).names

    # a saved edit of another model
    gpt2 = tiny_model("gpt2")
    result = apply_edit(gpt2, RECORDS[0].rewrite, "rome", _rome(corpus), progress=False)
    path = result.save(tmp_path / "gpt2-edit.pt")
    result.restore()
    line = _error_line(capsys, [*drift, "--edited", str(path)])
    assert "another model" in line and "--edited" in line

    assert "--workers" in _error_line(capsys, [*drift, "--edited", str(same), "--workers", "2"])


@pytest.mark.slow
def test_smollm2_rome_edit_saved_as_a_folder_drifts_like_the_in_process_edit(smollm2, tmp_path):
    """ROME on SmolLM2, handed over as an EditResult.save_pretrained folder and measured by
    ``drift --edited``: the same per-head drift as the in-process edit of the same request."""
    record = RECORDS[0]
    config = ROMEConfig(layer=5, clamp_norm_factor=2.0, mom2_adjustment=False, context_templates=((5, 2),))
    result = apply_edit(smollm2, record.rewrite, "rome", config, progress=False)
    result.restore()
    in_process = drift_record(smollm2, record, lambda r: result).to_line()
    folder = result.save_pretrained(tmp_path / "smollm2-rome")
    out = tmp_path / "run"
    assert cli.main(["drift", "--edited", str(folder), "--limit", "1", "--out", str(out), "--no-progress",
                     "--no-figures", "--threads", "1"]) == 0
    lines = [json.loads(l) for l in (out / "drift_records.jsonl").read_text().splitlines()]
    line = next(l for l in lines if l.get("case_id") == record.case_id and l.get("samples"))
    assert line["heads"] == in_process["heads"]
    assert json.dumps(line["samples"]) == json.dumps(in_process["samples"])
    assert max(max(max(row) for row in p) for p in line["heads"]["kl"]) > 0
