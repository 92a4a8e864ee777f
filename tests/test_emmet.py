"""EMMET on tiny random models: the equality constraints (each edited key mapped exactly to its
target value), the update against its closed form, the regulariser, undo / replay, config errors,
registry, presets, SADR and CLI, and a frozen reference of a seeded delta (pinned here, not in
``fixtures/reference_editing.json``).

Regenerate the pinned numbers only for an intended change of results:
``OMP_NUM_THREADS=1 python tests/test_emmet.py``."""

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
    EMMETConfig,
    MEMITConfig,
    StatsConfig,
    apply_edit,
    edit,
)
from attention_drift.editing.emmet import equality_update
from attention_drift.editing.memit import grouped_keys_and_outputs
from attention_drift.editing.stats import clear_memory_cache, key_second_moments
from attention_drift.editing.templates import context_templates

sys.path.insert(0, str(Path(__file__).parent))
from test_reference_editing import TINY_RTOL, compare_summary, result_summary  # noqa: E402

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
LOUVRE = Rewrite("The Louvre is in", "Louvre", "Japan", "Paris")
THREE = [EIFFEL, JORDAN, LOUVRE]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Statistics from 32 short texts sampled from the model, in a private cache."""
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    yield StatsConfig(corpus="model", n_samples=32, seq_len=24)
    clear_memory_cache()


def _config(corpus, **overrides):
    base = EMMETConfig(layers=(1,), steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0, stats=corpus)
    return dataclasses.replace(base, **overrides)


def _weights(model):
    return [b.mlp.out.weight.detach().clone() for b in model.blocks]


def _same(model, weights):
    return all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, weights))


def _out_by_key(model, layer, update):
    """An update in the ``[d_model, d_mlp]`` orientation (output = update @ key)."""
    update = update.double()
    return update.T if mlp_out_is_conv1d(model, layer) else update


def _targets(result, site):
    return torch.stack([(t.init[site] + t.delta[site]).double() for t in result.traces])


# ---------------------------------------------------------------- the equality constraints

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edited_layer_maps_every_edited_key_exactly_to_its_target_value(arch, corpus):
    """One layer, three requests, ``emmet_lambda = 0``: ``W_new K_E = V_E`` with ``V_E = W_0 K_E + (Z - H)``,
    i.e. ``Delta K_E = Z - H`` for every request (``K_E`` MEMIT's template-mean keys, ``Z`` the optimised
    residuals, ``H`` the residuals before the edit)."""
    model = tiny_model(arch)
    cfg = _config(corpus, emmet_lambda=0.0)
    groups = context_templates(model, cfg.context_templates, cfg.template_seed)
    site = act_name("resid_post", 1)
    keys, before = grouped_keys_and_outputs(model, THREE, groups, 1, site)
    result = apply_edit(model, THREE, "emmet", cfg, progress=False)
    keys_after, _ = grouped_keys_and_outputs(model, THREE, groups, 1, site)
    result.restore()
    torch.testing.assert_close(keys_after, keys)  # the keys are upstream of the edited projection
    delta = _out_by_key(model, 1, result.deltas["blocks.1.mlp.out.weight"])
    wanted = _targets(result, site) - before
    got = keys @ delta.T
    assert ((got - wanted).norm(dim=1) / wanted.norm(dim=1)).max() < 1e-5


@pytest.mark.parametrize("layers", [(1,), (0, 1)])
def test_bare_prompt_keys_reach_the_targets_exactly_over_one_or_two_layers(layers, corpus, tiny_llama):
    """Without prefixes the key is the bare prompt's, so the equalities put the z layer's output at
    the bare prompt exactly on the optimised targets for all requests at once, also when the residual
    is spread over two layers; MEMIT's least squares leaves a gap on the same edit."""
    cfg = _config(corpus, layers=layers, context_templates=(), emmet_lambda=0.0)
    groups = context_templates(tiny_llama, (), 0)
    site = act_name("resid_post", 1)
    _, before = grouped_keys_and_outputs(tiny_llama, THREE, groups, 1, site)
    with edit(tiny_llama, THREE, "emmet", cfg, progress=False) as result:
        _, after = grouped_keys_and_outputs(tiny_llama, THREE, groups, 1, site)
    target = _targets(result, site)
    gap = (after - target).norm(dim=1) / (target - before).norm(dim=1)
    assert gap.max() < 1e-5, gap
    memit = MEMITConfig(layers=layers, steps=6, context_templates=(), weight_decay=0.0, mom2_update_weight=50.0,
                        stats=corpus)
    with edit(tiny_llama, THREE, "memit", memit, progress=False):
        _, after_memit = grouped_keys_and_outputs(tiny_llama, THREE, groups, 1, site)
    assert ((after_memit - target).norm(dim=1) / (target - before).norm(dim=1)).max() > 1e-2


def test_regulariser_applies_to_batches_only(corpus, tiny_llama):
    """``emmet_lambda`` enters ``D`` only with two requests or more: one request is mapped exactly with
    the authors' 0.1; a batch with a large ``emmet_lambda`` misses its targets by a visible amount."""
    groups = context_templates(tiny_llama, (), 0)
    site = act_name("resid_post", 1)
    for requests, lam, exact in (([EIFFEL], 0.1, True), (THREE, 1e3, False)):
        cfg = _config(corpus, context_templates=(), emmet_lambda=lam)
        _, before = grouped_keys_and_outputs(tiny_llama, requests, groups, 1, site)
        with edit(tiny_llama, requests, "emmet", cfg, progress=False) as result:
            _, after = grouped_keys_and_outputs(tiny_llama, requests, groups, 1, site)
        gap = ((after - _targets(result, site)).norm(dim=1) / (_targets(result, site) - before).norm(dim=1)).max()
        assert (gap < 1e-5) if exact else (gap > 1e-2), (requests, lam, gap)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_is_the_closed_form_and_the_minimum_change_on_the_preserved_keys(arch, corpus):
    """``equality_update`` equals ``R (K^T C'^-1 K + lambda I)^-1 K^T C'^-1`` written with explicit inverses
    (``C' = mom2_update_weight C + update_norm_lambda I``), in the parameter's layout; with lambda 0, any
    other update meeting the same equalities changes the preserved keys more: ``tr(Delta C Delta^T)``."""
    model = tiny_model(arch)
    cov = key_second_moments(model, [1], corpus, progress=False)[1].double()
    gen = torch.Generator().manual_seed(0)
    d_mlp, d_model = cov.shape[0], int(model.cfg.d_model)
    keys = torch.randn(3, d_mlp, generator=gen, dtype=torch.float64).abs() * 0.1
    residuals = torch.randn(3, d_model, generator=gen, dtype=torch.float64)
    cfg = _config(corpus, mom2_update_weight=7.0, emmet_lambda=0.3, update_norm_lambda=1e-3)
    c = 7.0 * cov + 1e-3 * torch.eye(d_mlp, dtype=torch.float64)
    k = keys.T
    c_inv = torch.linalg.inv(c)
    expected = residuals.T @ torch.linalg.inv(k.T @ c_inv @ k + 0.3 * torch.eye(3, dtype=torch.float64)) @ k.T @ c_inv
    got = _out_by_key(model, 1, equality_update(model, 1, keys, residuals, cov, cfg))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    exact = _out_by_key(model, 1, equality_update(model, 1, keys, residuals, cov, _config(corpus, emmet_lambda=0.0)))
    torch.testing.assert_close(exact @ k, residuals.T, rtol=1e-8, atol=1e-9)
    other = exact + torch.randn(d_model, d_mlp, generator=gen, dtype=torch.float64) @ (
        torch.eye(d_mlp, dtype=torch.float64) - k @ torch.linalg.pinv(k))  # same values on K_E
    torch.testing.assert_close(other @ k, residuals.T, rtol=1e-8, atol=1e-9)
    assert torch.trace(exact @ cov @ exact.T) < torch.trace(other @ cov @ other.T)


# ---------------------------------------------------------------- undo, replay, saving

def test_undo_and_replay_are_bitwise(corpus, tmp_path):
    model = tiny_model("llama", n_layers=3)
    cfg = _config(corpus, layers=(0, 1))
    original = _weights(model)
    result = apply_edit(model, [EIFFEL, JORDAN], "emmet", cfg, progress=False)
    edited = _weights(model)
    assert not _same(model, original) and len(result.updates) == 2  # one per layer
    for _ in range(2):
        result.restore()
        assert _same(model, original)
        result.apply()
        assert _same(model, edited)
    result.restore()
    with pytest.raises(KeyError):
        with edit(model, [EIFFEL, JORDAN], "emmet", cfg, progress=False):
            raise KeyError("boom")
    assert _same(model, original)
    loaded = EditResult.load(result.save(tmp_path / "edit.pt"), model)
    assert loaded.method == "emmet" and loaded.config == result.config
    with loaded:
        assert _same(model, edited)
    assert _same(model, original)
    cache = EditCache(model, tmp_path / "edits")
    with cache.edit([EIFFEL, JORDAN], "emmet", cfg):
        first = _weights(model)
    with cache.edit([EIFFEL, JORDAN], "emmet", cfg):
        assert _same(model, first)
    assert (cache.hits, cache.misses) == (1, 1) and _same(model, original)


# ---------------------------------------------------------------- config, registry, presets, CLI

@pytest.mark.parametrize("overrides, needle", [
    ({"mom2_update_weight": 0.0}, "mom2_update_weight must be > 0"),
    ({"emmet_lambda": -0.1}, "emmet_lambda and update_norm_lambda must be >= 0"),
    ({"update_norm_lambda": -1.0}, "emmet_lambda and update_norm_lambda must be >= 0"),
    ({"layers": ()}, "layers is empty"),
    ({"layers": (1, 0)}, "strictly increasing"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_bad_configs_say_what_to_change(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        EMMETConfig(**{"layers": (0, 1), **overrides})


def test_out_of_range_layer_and_wrong_config_are_refused_before_any_weight_changes(corpus, tiny_llama):
    original = _weights(tiny_llama)
    with pytest.raises(ConfigError, match="EMMET edit layer 5 is out of range"):
        apply_edit(tiny_llama, EIFFEL, "emmet", _config(corpus, layers=(1, 5)))
    with pytest.raises(ConfigError, match="needs a EMMETConfig"):
        apply_edit(tiny_llama, EIFFEL, "emmet", MEMITConfig(layers=(0, 1)))
    assert _same(tiny_llama, original)


def test_registry_presets_sadr_and_cli_know_emmet(tiny_llama, monkeypatch):
    import argparse
    import types

    import attention_drift.editing.config as config
    from attention_drift import cli
    from attention_drift.editing import CONFIG_TYPES, EDITORS, METHODS, ROMEConfig
    from attention_drift.editing.sadr import PUBLISHED, SADRConfig
    from attention_drift.runs.variants import Variant

    assert "emmet" in METHODS and CONFIG_TYPES["emmet"] is EMMETConfig and EDITORS["emmet"].state_type is None
    preset, memit = EMMETConfig.for_model(tiny_llama), MEMITConfig.for_model(tiny_llama)
    assert preset.layers == (ROMEConfig.for_model(tiny_llama).layer,)
    assert (preset.steps, preset.stats, preset.context_templates) == (memit.steps, memit.stats, memit.context_templates)
    assert (preset.mom2_update_weight, preset.emmet_lambda, preset.update_norm_lambda) == (1.0, 0.1, 0.0)
    resolved = SADRConfig().resolved(tiny_llama, "emmet")
    assert (resolved.weight, resolved.steps) == PUBLISHED["memit"]
    parser = argparse.ArgumentParser()
    cli.add_variant_arguments(parser)
    variant = cli.variant_from_args(parser.parse_args(["--method", "emmet"]))
    assert variant == Variant("emmet", "emmet")
    cfg, sadr = variant.resolve(tiny_llama)
    assert isinstance(cfg, EMMETConfig) and sadr is None
    # SmolLM2-135M: the ROME layer alone (the authors' single-layer EMMET), MEMIT's value optimisation
    monkeypatch.setattr(config, "model_family", lambda model: "llama")
    monkeypatch.setattr(config, "n_layers", lambda model: 30)
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=576))
    smol = EMMETConfig.for_model(fake)
    assert smol.layers == (5,) and (smol.clamp_norm_factor, smol.steps, smol.lr) == (0.75, 20, 0.5)
    # GPT-2 XL: the authors' file (layer 17, mom2_update_weight 1000)
    monkeypatch.setattr(config, "model_family", lambda model: "gpt2")
    monkeypatch.setattr(config, "n_layers", lambda model: 48)
    xl = EMMETConfig.for_model(types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=1600)))
    assert xl.layers == (17,) and xl.mom2_update_weight == 1000.0


# ---------------------------------------------------------------- frozen reference

# result_summary of reference_case() on seeded 3-layer tiny models (see test_reference_editing.py
# for the summary and the tolerances), written by ``python tests/test_emmet.py``.
PINNED = json.loads("""
{
 "llama": {
  "layers": [
   0,
   1
  ],
  "deltas": {
   "blocks.0.mlp.out.weight": {
    "shape": [
     64,
     128
    ],
    "norm": 16.520975642737223,
    "sum": -52.83524389000377,
    "abs_sum": 1024.544379258121,
    "max_abs": 1.0786384344100952,
    "entries": {
     "0,0": -0.1348097324371338,
     "7,13": -0.10732879489660263,
     "31,63": 0.14081476628780365,
     "63,5": -0.037328243255615234,
     "18,120": 1.0786384344100952
    }
   },
   "blocks.1.mlp.out.weight": {
    "shape": [
     64,
     128
    ],
    "norm": 16.079056501866848,
    "sum": -9.847867654039874,
    "abs_sum": 1012.6754351435666,
    "max_abs": 1.1121834516525269,
    "entries": {
     "0,0": 0.023366514593362808,
     "7,13": 0.4378494620323181,
     "31,63": 0.03502088412642479,
     "63,5": -0.09116611629724503,
     "17,77": -1.1121834516525269
    }
   }
  },
  "loss": [
   [
    5.843811511993408,
    5.756423473358154,
    5.740785598754883,
    5.734952449798584,
    5.732256889343262,
    5.730808258056641,
    5.729908466339111,
    5.729269981384277
   ],
   [
    6.021132469177246,
    5.9417901039123535,
    5.931882858276367,
    5.928337574005127,
    5.926634788513184,
    5.925586223602295,
    5.924793243408203,
    5.9241108894348145
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
   0,
   1
  ],
  "deltas": {
   "blocks.0.mlp.out.weight": {
    "shape": [
     256,
     64
    ],
    "norm": 15.415867124409505,
    "sum": 0.7981679501972394,
    "abs_sum": 1442.3165937019949,
    "max_abs": 0.7504358291625977,
    "entries": {
     "0,0": 0.042833007872104645,
     "7,13": -0.017115451395511627,
     "31,63": 0.01998680643737316,
     "63,5": -0.0698080062866211,
     "43,34": 0.7504358291625977
    }
   },
   "blocks.1.mlp.out.weight": {
    "shape": [
     256,
     64
    ],
    "norm": 6.603308493712234,
    "sum": 0.07257768541603582,
    "abs_sum": 615.2235508516387,
    "max_abs": 0.3206065595149994,
    "entries": {
     "0,0": -0.03946661576628685,
     "7,13": -0.006826960947364569,
     "31,63": 0.013430028222501278,
     "63,5": -0.04010795056819916,
     "59,49": 0.3206065595149994
    }
   }
  },
  "loss": [
   [
    5.91163444519043,
    5.8838958740234375,
    5.880638122558594,
    5.879475116729736,
    5.878904819488525,
    5.878550052642822,
    5.878284454345703,
    5.878063201904297
   ],
   [
    6.06796407699585,
    6.042417526245117,
    6.037542343139648,
    6.0360541343688965,
    6.035494804382324,
    6.035189628601074,
    6.034954071044922,
    6.034745216369629
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
    cfg = EMMETConfig(layers=(0, 1), v_loss_layer=None, lr=0.1, steps=8, weight_decay=1e-6, clamp_norm_factor=50.0,
                      kl_factor=0.0625, early_stop_loss=0.05, mom2_update_weight=1.0, emmet_lambda=0.1,
                      update_norm_lambda=0.0, context_templates=((4, 3),), stats=stats, template_seed=0)
    return cfg, [EIFFEL, JORDAN]


def run_reference(arch: str) -> dict:
    model = tiny_model(arch, n_layers=3)
    cfg, requests = reference_case()
    result = apply_edit(model, requests, "emmet", cfg, progress=False)
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
