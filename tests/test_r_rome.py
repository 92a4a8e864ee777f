"""r-ROME on tiny random models: the key of the rank-one update (the template mean, as the paper
and the authors' code; p-ROME's bare-prompt key with ``keys="prompt"``), the exact mapping of that
key to the target value, undo / replay, config errors, registry, presets, SADR and CLI, and a frozen
reference of a seeded delta (pinned here, not in ``fixtures/reference_editing.json``).

Regenerate the pinned numbers only for an intended change of results:
``OMP_NUM_THREADS=1 python tests/test_r_rome.py``."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import act_name
from attention_drift.core.models import mlp_out_is_conv1d, tiny_model
from attention_drift.editing import (
    ConfigError,
    EditCache,
    EditResult,
    ROMEConfig,
    RROMEConfig,
    StatsConfig,
    apply_edit,
    edit,
)
from attention_drift.editing.optimize import subject_activations, template_rows
from attention_drift.editing.stats import clear_memory_cache, inverse_second_moment
from attention_drift.editing.templates import context_templates

sys.path.insert(0, str(Path(__file__).parent))
from test_reference_editing import TINY_RTOL, compare_summary, result_summary  # noqa: E402

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Statistics from 32 short texts sampled from the model, in a private cache."""
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    yield StatsConfig(corpus="model", n_samples=32, seq_len=24)
    clear_memory_cache()


def _config(corpus, **overrides):
    base = RROMEConfig(layer=1, steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0, stats=corpus)
    return dataclasses.replace(base, **overrides)


def _weights(model):
    return [b.mlp.out.weight.detach().clone() for b in model.blocks]


def _same(model, weights):
    return all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, weights))


def _rows(model, request, cfg, layer):
    """MLP keys and outputs at the subject's last token of each template row (row 0: bare prompt)."""
    flat = [t for g in context_templates(model, cfg.context_templates, cfg.template_seed) for t in g]
    prompts, positions = template_rows(model, request, flat)
    key_hook, out_hook = act_name("mlp_post", layer), act_name("mlp_raw", layer)
    acts = subject_activations(model, prompts, positions, [key_hook, out_hook])
    return acts[key_hook].double(), acts[out_hook].double()


# ---------------------------------------------------------------- the key and the exact mapping

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_maps_the_template_mean_key_exactly_to_the_target_value(arch, corpus):
    """r-ROME: the update is ``r u^T`` with ``u`` along ``C^-1 k*`` (``k*`` the key averaged over the
    templates, bare prompt included) and maps ``k*`` to ``v*``: the templates' mean MLP output (which
    is ``W k* + b``) equals ``v* = v_init + delta`` after the edit. The bare prompt's own output does not."""
    model = tiny_model(arch)
    cfg = _config(corpus)
    keys, outputs_before = _rows(model, EIFFEL, cfg, 1)
    k_star = keys.mean(0)
    with edit(model, EIFFEL, "r-rome", cfg, progress=False) as result:
        keys_after, outputs_after = _rows(model, EIFFEL, cfg, 1)
    site = act_name("mlp_raw", 1)
    trace = result.traces[0]
    target = (trace.init[site] + trace.delta[site]).double()
    torch.testing.assert_close(keys_after, keys)  # the keys are upstream of the edited projection
    scale = (target - outputs_before.mean(0)).norm()
    assert (outputs_after.mean(0) - target).norm() < 1e-5 * scale + 1e-6
    assert (outputs_after[0] - target).norm() > 1e-3 * scale  # not the bare prompt's key
    delta = result.deltas["blocks.1.mlp.out.weight"].double()
    delta = delta.T if mlp_out_is_conv1d(model, 1) else delta  # [d_model, d_mlp]
    u = inverse_second_moment(model, 1, corpus).double() @ k_star
    singular = torch.linalg.svdvals(delta)
    assert singular[1] < 1e-6 * singular[0]  # rank one
    right = torch.linalg.svd(delta)[2][0]
    assert abs(torch.dot(right, u / u.norm())) > 1 - 1e-6


def test_p_rome_keys_use_the_bare_prompt_everywhere(corpus, tiny_llama):
    """``keys="prompt"`` (p-ROME): ``u`` along ``C^-1 k`` and the bare prompt's output mapped to ``v*``."""
    cfg = _config(corpus, keys="prompt")
    keys, _ = _rows(tiny_llama, EIFFEL, cfg, 1)
    with edit(tiny_llama, EIFFEL, "r-rome", cfg, progress=False) as result:
        _, outputs_after = _rows(tiny_llama, EIFFEL, cfg, 1)
    site = act_name("mlp_raw", 1)
    target = (result.traces[0].init[site] + result.traces[0].delta[site]).double()
    assert (outputs_after[0] - target).norm() < 1e-5 * target.norm()
    u = inverse_second_moment(tiny_llama, 1, corpus).double() @ keys[0]
    right = torch.linalg.svd(result.deltas["blocks.1.mlp.out.weight"].double())[2][0]
    assert abs(torch.dot(right, u / u.norm())) > 1 - 1e-6


def test_rome_and_r_rome_share_the_value_and_differ_in_the_key(corpus, tiny_llama):
    """Same value optimisation (same loss trace and v*), different update: ROME's residual and
    denominator use the bare prompt's key, r-ROME's the template mean."""
    shared = dict(layer=1, steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0, stats=corpus)
    rome = apply_edit(tiny_llama, EIFFEL, "rome", ROMEConfig(**shared), progress=False)
    rome.restore()
    r_rome = apply_edit(tiny_llama, EIFFEL, "r-rome", RROMEConfig(**shared), progress=False)
    r_rome.restore()
    assert rome.traces[0].loss == r_rome.traces[0].loss
    a, b = rome.deltas["blocks.1.mlp.out.weight"], r_rome.deltas["blocks.1.mlp.out.weight"]
    assert (a - b).norm() > 1e-3 * a.norm()
    # the same direction u = C^-1 k* (only the scale and the residual differ)
    ra, rb = torch.linalg.svd(a.double())[2][0], torch.linalg.svd(b.double())[2][0]
    assert abs(torch.dot(ra, rb)) > 1 - 1e-6


# ---------------------------------------------------------------- undo, replay, saving

def test_undo_and_replay_are_bitwise(corpus, tmp_path):
    model = tiny_model("llama", n_layers=3)
    original = _weights(model)
    result = apply_edit(model, [EIFFEL, JORDAN], "r-rome", _config(corpus), progress=False)
    edited = _weights(model)
    assert not _same(model, original) and len(result.updates) == 2  # one per request, in turn
    for _ in range(2):
        result.restore()
        assert _same(model, original)
        result.apply()
        assert _same(model, edited)
    result.restore()
    with pytest.raises(KeyError):
        with edit(model, EIFFEL, "r-rome", _config(corpus), progress=False):
            raise KeyError("boom")
    assert _same(model, original)
    loaded = EditResult.load(result.save(tmp_path / "edit.pt"), model)
    assert loaded.method == "r-rome" and loaded.config == result.config
    with loaded:
        assert _same(model, edited)
    assert _same(model, original)
    cache = EditCache(model, tmp_path / "edits")
    with cache.edit(EIFFEL, "r-rome", _config(corpus)):
        first = _weights(model)
    with cache.edit(EIFFEL, "r-rome", _config(corpus)):
        assert _same(model, first)
    assert (cache.hits, cache.misses) == (1, 1) and _same(model, original)


# ---------------------------------------------------------------- config, registry, presets, CLI

@pytest.mark.parametrize("overrides, needle", [
    ({"keys": "bare"}, "keys must be one of"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
])
def test_bad_configs_say_what_to_change(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        RROMEConfig(**{"layer": 0, **overrides})


def test_out_of_range_layer_and_wrong_config_are_refused_before_any_weight_changes(corpus, tiny_llama):
    original = _weights(tiny_llama)
    with pytest.raises(ConfigError, match="r-ROME edit layer 5 is out of range"):
        apply_edit(tiny_llama, EIFFEL, "r-rome", _config(corpus, layer=5))
    with pytest.raises(ConfigError, match="needs a RROMEConfig"):
        apply_edit(tiny_llama, EIFFEL, "r-rome", ROMEConfig(layer=0))
    with pytest.raises(ConfigError, match="needs a ROMEConfig"):
        apply_edit(tiny_llama, EIFFEL, "rome", RROMEConfig(layer=0))
    assert _same(tiny_llama, original)


def test_registry_presets_sadr_and_cli_know_r_rome(tiny_llama, monkeypatch):
    import argparse
    import types

    import attention_drift.editing.config as config
    from attention_drift import cli
    from attention_drift.editing import CONFIG_TYPES, EDITORS, METHODS
    from attention_drift.editing.sadr import PUBLISHED, SADRConfig
    from attention_drift.runs.variants import Variant

    assert "r-rome" in METHODS and CONFIG_TYPES["r-rome"] is RROMEConfig and EDITORS["r-rome"].state_type is None
    preset, rome = RROMEConfig.for_model(tiny_llama), ROMEConfig.for_model(tiny_llama)
    assert all(getattr(preset, f.name) == getattr(rome, f.name) for f in dataclasses.fields(ROMEConfig))
    assert preset.keys == "prefixes"
    resolved = SADRConfig().resolved(tiny_llama, "r-rome")
    assert (resolved.weight, resolved.steps) == PUBLISHED["rome"]
    parser = argparse.ArgumentParser()
    cli.add_variant_arguments(parser)
    variant = cli.variant_from_args(parser.parse_args(["--method", "r-rome"]))
    assert variant == Variant("r-rome", "r-rome")
    cfg, sadr = variant.resolve(tiny_llama)
    assert isinstance(cfg, RROMEConfig) and sadr is None
    # SmolLM2-135M: ROME's preset (layer 5, clamp 2)
    monkeypatch.setattr(config, "model_family", lambda model: "llama")
    monkeypatch.setattr(config, "n_layers", lambda model: 30)
    smol = RROMEConfig.for_model(types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=576)))
    assert (smol.layer, smol.clamp_norm_factor, smol.steps) == (5, 2.0, 20)


# ---------------------------------------------------------------- frozen reference

# result_summary of reference_case() on seeded 3-layer tiny models (see test_reference_editing.py
# for the summary and the tolerances), written by ``python tests/test_r_rome.py``.
PINNED = json.loads("""
{
 "llama": {
  "layers": [
   1
  ],
  "deltas": {
   "blocks.1.mlp.out.weight": {
    "shape": [
     64,
     128
    ],
    "norm": 25.918266526112582,
    "sum": 25.425689751689788,
    "abs_sum": 1579.8448868777486,
    "max_abs": 1.9833029508590698,
    "entries": {
     "0,0": -0.372843861579895,
     "7,13": 0.021619178354740143,
     "31,63": -0.5592451095581055,
     "63,5": -0.15598352253437042,
     "18,126": -1.9833029508590698
    }
   }
  },
  "loss": [
   [
    5.823182582855225,
    5.741067409515381,
    5.728846073150635,
    5.724827289581299,
    5.722459316253662,
    5.721081256866455,
    5.720149517059326,
    5.71937894821167
   ],
   [
    6.045560836791992,
    5.97636604309082,
    5.968110084533691,
    5.965368747711182,
    5.964025497436523,
    5.963168621063232,
    5.96251916885376,
    5.961979866027832
   ]
  ],
  "sadr_loss": [
   [],
   []
  ],
  "steps_run": [
   8,
   8
  ]
 },
 "gpt2": {
  "layers": [
   1
  ],
  "deltas": {
   "blocks.1.mlp.out.weight": {
    "shape": [
     256,
     64
    ],
    "norm": 32.892640520392604,
    "sum": 2.7369309141649865,
    "abs_sum": 3078.287558425276,
    "max_abs": 1.662353754043579,
    "entries": {
     "0,0": 0.042788732796907425,
     "7,13": 0.2506096363067627,
     "31,63": -0.13677504658699036,
     "63,5": -0.3190629780292511,
     "143,34": 1.662353754043579
    }
   }
  },
  "loss": [
   [
    5.943383693695068,
    5.918868064880371,
    5.9161200523376465,
    5.915078163146973,
    5.9145636558532715,
    5.914254665374756,
    5.914039611816406,
    5.913869380950928
   ],
   [
    6.040872573852539,
    6.025611877441406,
    6.022791862487793,
    6.021875858306885,
    6.021512031555176,
    6.021315097808838,
    6.021171569824219,
    6.021048069000244
   ]
  ],
  "sadr_loss": [
   [],
   []
  ],
  "steps_run": [
   8,
   8
  ]
 }
}
""")


def reference_case():
    stats = StatsConfig(corpus="model", n_samples=32, seq_len=24, batch_size=32, seed=0)
    cfg = RROMEConfig(layer=1, v_loss_layer=None, lr=0.1, steps=8, weight_decay=1e-6, clamp_norm_factor=50.0,
                      kl_factor=0.0625, early_stop_loss=0.05, context_templates=((4, 2), (6, 2)),
                      mom2_adjustment=True, stats=stats, template_seed=0, keys="prefixes")
    return cfg, [EIFFEL, JORDAN]


def run_reference(arch: str) -> dict:
    model = tiny_model(arch, n_layers=3)
    cfg, requests = reference_case()
    result = apply_edit(model, requests, "r-rome", cfg, progress=False)
    summary = result_summary(result)
    result.restore()
    return summary


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_the_frozen_reference(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    problems = compare_summary(run_reference(arch), PINNED[arch], TINY_RTOL)
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    import os
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATTENTION_DRIFT_CACHE"] = tmp
        pinned = {}
        for arch in ("llama", "gpt2"):
            torch.manual_seed(0)
            clear_memory_cache()
            pinned[arch] = run_reference(arch)
    text = Path(__file__).read_text()
    start = text.index('PINNED = json.loads("""') + len('PINNED = json.loads("""')
    end = text.index('""")', start)
    Path(__file__).write_text(text[:start] + "\n" + json.dumps(pinned, indent=1) + "\n" + text[end:])
    print(json.dumps(pinned, indent=1)[:2000])
