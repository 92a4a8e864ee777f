"""Context templates: made once per model, spec and seed, then read from memory or disk."""

import json

import pytest

from attention_drift.editing import templates as templates_mod

SPEC = ((4, 3), (6, 2))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    templates_mod.clear_cache()
    yield
    templates_mod.clear_cache()


def _refuse_sampling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("templates were sampled again")

    monkeypatch.setattr(templates_mod, "sample_tokens", refuse)


def test_templates_shape_and_determinism(tiny_llama):
    groups = templates_mod.context_templates(tiny_llama, SPEC, seed=0)
    assert groups[0] == ["{}"] and [len(g) for g in groups[1:]] == [3, 2]
    assert all(t.endswith(". {}") and t.count("{}") == 1 for g in groups[1:] for t in g)
    templates_mod.clear_cache()
    path = templates_mod.templates_path(tiny_llama, SPEC, 0)
    path.unlink()
    assert templates_mod.context_templates(tiny_llama, SPEC, seed=0) == groups


def test_second_process_reads_templates_from_disk(tiny_llama, monkeypatch):
    groups = templates_mod.context_templates(tiny_llama, SPEC, seed=0)
    path = templates_mod.templates_path(tiny_llama, SPEC, 0)
    assert path.exists() and json.loads(path.read_text())["groups"] == groups
    templates_mod.clear_cache()  # what a new process starts with
    _refuse_sampling(monkeypatch)
    assert templates_mod.context_templates(tiny_llama, SPEC, seed=0) == groups
    with pytest.raises(AssertionError, match="sampled again"):
        templates_mod.context_templates(tiny_llama, SPEC, seed=1)  # another seed is another file
    with pytest.raises(AssertionError, match="sampled again"):
        templates_mod.context_templates(tiny_llama, ((4, 3),), seed=0)


def test_damaged_or_foreign_template_files_are_regenerated(tiny_llama, tiny_gpt2):
    groups = templates_mod.context_templates(tiny_llama, SPEC, seed=0)
    path = templates_mod.templates_path(tiny_llama, SPEC, 0)
    assert templates_mod.templates_path(tiny_gpt2, SPEC, 0) != path  # keyed by the model too
    for damage in ("not json", json.dumps({"spec": [[4, 3], [6, 2]], "seed": 0, "groups": [["{}"], ["a. {}"]]})):
        path.write_text(damage)
        templates_mod.clear_cache()
        assert templates_mod.context_templates(tiny_llama, SPEC, seed=0) == groups
