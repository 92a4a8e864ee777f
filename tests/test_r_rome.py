"""r-ROME on tiny random models: the key of the rank-one update (the mean of the template groups'
means, as the authors' ``r_rome`` module; p-ROME's bare-prompt key with ``keys="prompt"``), the
exact mapping of that key to its present value plus the optimised delta, undo / replay, config errors, registry, presets, SADR and CLI, and a frozen
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
from attention_drift.editing.config import MEMIT_TEMPLATES
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


def _group_mean(rows, model, cfg):
    """The mean of the template groups' means, computed by hand: (bare + mean(group 1) + ...) / groups."""
    sizes = [len(g) for g in context_templates(model, cfg.context_templates, cfg.template_seed)]
    assert sizes[0] == 1 and len(sizes) == 3  # "{}" and the two groups of _config
    first, second = rows[1:1 + sizes[1]].mean(0), rows[1 + sizes[1]:].mean(0)
    return (rows[0] + first + second) / 3


# ---------------------------------------------------------------- the key and the exact mapping

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_maps_the_group_mean_key_to_its_output_plus_delta(arch, corpus):
    """r-ROME: the update is ``r u^T`` with ``u`` along ``C^-1 k*`` (``k*`` the mean of the template
    groups' mean keys, the bare prompt a group of its own) and maps ``k*`` to ``W k* + b + delta``:
    the groups' mean MLP output moves by exactly the optimised ``delta``. The bare prompt's own
    output does not (its key is not ``k*``)."""
    model = tiny_model(arch)
    cfg = _config(corpus)
    keys, outputs_before = _rows(model, EIFFEL, cfg, 1)
    k_star = _group_mean(keys, model, cfg)
    with edit(model, EIFFEL, "r-rome", cfg, progress=False) as result:
        keys_after, outputs_after = _rows(model, EIFFEL, cfg, 1)
    delta = result.traces[0].delta[act_name("mlp_raw", 1)].double()
    torch.testing.assert_close(keys_after, keys)  # the keys are upstream of the edited projection
    moved = _group_mean(outputs_after, model, cfg) - _group_mean(outputs_before, model, cfg)
    assert (moved - delta).norm() < 1e-5 * delta.norm()
    assert ((outputs_after[0] - outputs_before[0]) - delta).norm() > 1e-3 * delta.norm()
    weight = result.deltas["blocks.1.mlp.out.weight"].double()
    weight = weight.T if mlp_out_is_conv1d(model, 1) else weight  # [d_model, d_mlp]
    u = inverse_second_moment(model, 1, corpus).double() @ k_star
    singular = torch.linalg.svdvals(weight)
    assert singular[1] < 1e-6 * singular[0]  # rank one
    right = torch.linalg.svd(weight)[2][0]
    assert abs(torch.dot(right, u / u.norm())) > 1 - 1e-6


def test_flat_template_mean_is_not_the_key(corpus, tiny_llama):
    """The key weighs each group, not each template: with groups of 2 and 4 templates the update
    moves the mean of the group means by exactly ``delta``, and the flat mean over the 7 rows (the
    ``rome/`` branch's key) by something else."""
    cfg = _config(corpus, context_templates=((4, 2), (6, 4)))
    _, before = _rows(tiny_llama, EIFFEL, cfg, 1)
    with edit(tiny_llama, EIFFEL, "r-rome", cfg, progress=False) as result:
        _, after = _rows(tiny_llama, EIFFEL, cfg, 1)
    delta = result.traces[0].delta[act_name("mlp_raw", 1)].double()
    moved = after - before
    by_group = torch.stack([g.mean(0) for g in moved.split([1, 2, 4])]).mean(0)
    assert (by_group - delta).norm() < 1e-5 * delta.norm()
    assert (moved.mean(0) - delta).norm() > 1e-3 * delta.norm()


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
    """Same value optimisation (same loss trace and delta), different update: ROME's residual and
    denominator use the bare prompt's key and its direction the flat template mean, r-ROME all
    three the mean of the group means."""
    shared = dict(layer=1, steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0, stats=corpus)
    rome = apply_edit(tiny_llama, EIFFEL, "rome", ROMEConfig(**shared), progress=False)
    rome.restore()
    r_rome = apply_edit(tiny_llama, EIFFEL, "r-rome", RROMEConfig(**shared), progress=False)
    r_rome.restore()
    assert rome.traces[0].loss == r_rome.traces[0].loss
    a, b = rome.deltas["blocks.1.mlp.out.weight"], r_rome.deltas["blocks.1.mlp.out.weight"]
    assert (a - b).norm() > 1e-3 * a.norm()
    keys, _ = _rows(tiny_llama, EIFFEL, RROMEConfig(**shared), 1)
    inverse = inverse_second_moment(tiny_llama, 1, corpus).double()
    for upd, key in ((a, keys.mean(0)), (b, _group_mean(keys, tiny_llama, RROMEConfig(**shared)))):
        u = inverse @ key
        assert abs(torch.dot(torch.linalg.svd(upd.double())[2][0], u / u.norm())) > 1 - 1e-6


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
    assert all(getattr(preset, f.name) == getattr(rome, f.name) for f in dataclasses.fields(ROMEConfig)
               if f.name != "context_templates")
    assert preset.keys == "prefixes" and preset.context_templates == MEMIT_TEMPLATES != rome.context_templates
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
    "norm": 26.374239587057335,
    "sum": 15.259679296112154,
    "abs_sum": 1627.1079998034402,
    "max_abs": 1.867361307144165,
    "entries": {
     "0,0": -0.3744949698448181,
     "7,13": -0.04632540047168732,
     "31,63": -0.50049889087677,
     "63,5": -0.23982329666614532,
     "18,126": -1.867361307144165
    }
   }
  },
  "loss": [
   [
    5.823182582855225,
    5.741066932678223,
    5.728846073150635,
    5.724827289581299,
    5.722459316253662,
    5.721081733703613,
    5.720149517059326,
    5.71937894821167
   ],
   [
    6.049872875213623,
    5.9818196296691895,
    5.973830223083496,
    5.971141338348389,
    5.969812870025635,
    5.9689717292785645,
    5.96834659576416,
    5.967833995819092
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
    "norm": 32.02568936169615,
    "sum": 1.8292228890932165,
    "abs_sum": 3011.2752330741496,
    "max_abs": 1.5862345695495605,
    "entries": {
     "0,0": -0.005115282256156206,
     "7,13": 0.2553723156452179,
     "31,63": -0.15447606146335602,
     "63,5": -0.2820868492126465,
     "143,34": 1.5862345695495605
    }
   }
  },
  "loss": [
   [
    5.94338321685791,
    5.918867588043213,
    5.9161200523376465,
    5.915078163146973,
    5.9145636558532715,
    5.914255142211914,
    5.914039611816406,
    5.913870334625244
   ],
   [
    6.0378546714782715,
    6.021357536315918,
    6.018364429473877,
    6.017343997955322,
    6.0169291496276855,
    6.016709804534912,
    6.0165581703186035,
    6.01643180847168
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
