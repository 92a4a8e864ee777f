"""AlphaEdit on tiny random models: the null-space projection, its cache, the projected update,
sequential editing with the previous keys, undo / replay / saving, config errors, registry and CLI.
(The frozen reference of a seeded AlphaEdit delta is in ``test_reference_editing.py``.)"""

import dataclasses

import pytest
import torch

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import act_name
from attention_drift.core.models import mlp_out_is_conv1d, tiny_model
from attention_drift.editing import (
    AlphaEditConfig,
    ConfigError,
    EditCache,
    EditError,
    EditResult,
    MEMITConfig,
    PreviousKeys,
    StatsConfig,
    apply_edit,
    edit,
)
from attention_drift.editing.memit import grouped_keys_and_outputs
from attention_drift.editing.stats import (
    clear_memory_cache,
    key_second_moments,
    null_space_projection,
    projection_path,
    stats_path,
)
from attention_drift.editing.templates import context_templates

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
LOUVRE = Rewrite("The Louvre is in", "Louvre", "Japan", "Paris")
# per architecture: (threshold, L2) at the scale of the tiny random model's keys (see config.py)
SCALE = {"llama": (1e-4, 1e-4), "gpt2": (2e-2, 1e-2)}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Statistics from 32 short texts sampled from the model, in a private cache."""
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    clear_memory_cache()
    yield StatsConfig(corpus="model", n_samples=32, seq_len=24)
    clear_memory_cache()


def _config(corpus, arch="llama", **overrides):
    threshold, l2 = SCALE[arch]
    base = AlphaEditConfig(layers=(0, 1), steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0,
                           nullspace_threshold=threshold, l2=l2, stats=corpus)
    return dataclasses.replace(base, **overrides)


def _weights(model):
    return [b.mlp.out.weight.detach().clone() for b in model.blocks]


def _same(model, weights):
    return all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, weights))


def _as_out_by_key(model, layer, update):
    """An update in the ``[d_model, d_mlp]`` orientation (output = update @ key)."""
    update = update.double()
    return update.T if mlp_out_is_conv1d(model, layer) else update


# ---------------------------------------------------------------- the projection

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_projection_is_the_orthogonal_projection_on_the_small_eigenvectors(arch, corpus):
    model = tiny_model(arch)
    threshold = SCALE[arch][0]
    for layer in (0, 1):
        proj = null_space_projection(model, layer, corpus, threshold, progress=False)
        cov = key_second_moments(model, [layer], corpus, progress=False)[layer].double()
        evals = torch.linalg.eigvalsh(cov)
        null_dim = int((evals < threshold).sum())
        assert proj.dtype == torch.float64 and torch.equal(proj, proj.T)
        assert (proj @ proj - proj).abs().max() < 1e-12
        assert 0 < null_dim < cov.shape[0] and round(torch.trace(proj).item()) == null_dim
        # C restricted to the null space has no eigenvalue above the threshold
        assert torch.linalg.eigvalsh(proj @ cov @ proj).max() < threshold * (1 + 1e-9)


def test_cached_projection_loads_bitwise_equal_and_follows_its_statistics(corpus, tiny_llama):
    computed = null_space_projection(tiny_llama, 1, corpus, 1e-4, progress=False).clone()
    path = projection_path(tiny_llama, 1, corpus, 1e-4)
    assert path.is_file() and path.parent == stats_path(tiny_llama, 1, corpus).parent
    assert path.with_suffix(".json").is_file()
    clear_memory_cache()  # forget both C and P: P comes from the disk now
    loaded = null_space_projection(tiny_llama, 1, corpus, 1e-4, progress=False)
    assert torch.equal(loaded, computed) and loaded.dtype == computed.dtype
    assert null_space_projection(tiny_llama, 1, corpus, 1e-4) is loaded  # kept in memory
    other = null_space_projection(tiny_llama, 1, corpus, 2e-4, progress=False)
    assert projection_path(tiny_llama, 1, corpus, 2e-4) != path and torch.trace(other) > torch.trace(loaded)
    # a projection file made from other statistics is not used
    stats_file = stats_path(tiny_llama, 1, corpus)
    from safetensors.torch import load_file, save_file

    data = load_file(stats_file)
    save_file({**data, "mom2": data["mom2"] * 2}, stats_file)
    clear_memory_cache()
    rescaled = null_space_projection(tiny_llama, 1, corpus, 1e-4, progress=False)
    assert torch.trace(rescaled) < torch.trace(computed)


# ---------------------------------------------------------------- the update

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_leaves_the_preserved_keys_alone_and_memit_does_not(arch, corpus):
    """``Delta = Delta P``: the update has no component outside the null space, so the mean squared
    output change on the statistics' keys, ``tr(Delta C Delta^T)``, is at most ``threshold ||Delta||^2``.
    MEMIT's update (soft trade-off through ``lambda C``) has a clear component outside it."""
    model = tiny_model(arch)
    threshold = SCALE[arch][0]
    alpha = apply_edit(model, [EIFFEL, JORDAN], "alphaedit", _config(corpus, arch), progress=False)
    alpha.restore()
    memit_cfg = MEMITConfig(layers=(0, 1), steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0,
                            mom2_update_weight=50.0, stats=corpus)
    memit = apply_edit(model, [EIFFEL, JORDAN], "memit", memit_cfg, progress=False)
    memit.restore()
    for (name, a_upd), (_, m_upd) in zip(alpha.updates, memit.updates):
        layer = int(name.split(".")[1])
        proj = null_space_projection(model, layer, corpus, threshold)
        cov = key_second_moments(model, [layer], corpus)[layer].double()
        a, m = _as_out_by_key(model, layer, a_upd), _as_out_by_key(model, layer, m_upd)
        assert (a @ proj - a).norm() / a.norm() < 1e-5  # float32 rounding of the update
        assert (m @ proj - m).norm() / m.norm() > 5e-3
        assert torch.trace(a @ cov @ a.T) <= threshold * a.norm() ** 2 * (1 + 1e-4)
        assert a.norm() > 1e-3


def test_edit_moves_the_last_layer_output_to_its_target(corpus, tiny_llama):
    """The z layer's output at the bare prompt closes most of the way to the optimised target."""
    cfg = _config(corpus)
    groups = context_templates(tiny_llama, cfg.context_templates, cfg.template_seed)
    site = act_name("resid_post", 1)
    _, before = grouped_keys_and_outputs(tiny_llama, [EIFFEL, JORDAN], groups, 1, site)
    with edit(tiny_llama, [EIFFEL, JORDAN], "alphaedit", cfg, progress=False) as result:
        _, after = grouped_keys_and_outputs(tiny_llama, [EIFFEL, JORDAN], groups, 1, site)
    target = torch.stack([t.init[site] + t.delta[site] for t in result.traces]).double()
    closed = 1 - (target - after).norm(dim=1) / (target - before).norm(dim=1)
    assert (closed > 0.8).all(), closed


# ---------------------------------------------------------------- sequential editing

def test_previous_keys_keep_the_earlier_edits_outputs(corpus, tiny_llama):
    cfg = _config(corpus)
    first = apply_edit(tiny_llama, [EIFFEL, JORDAN], "alphaedit", cfg, progress=False)
    state = first.state
    assert isinstance(state, PreviousKeys) and state.count == 2 and sorted(state.grams) == [0, 1]
    assert first.key is not None  # a first edit (no state given) keeps its key
    groups = context_templates(tiny_llama, cfg.context_templates, cfg.template_seed)
    site = act_name("resid_post", 1)
    keys = {l: grouped_keys_and_outputs(tiny_llama, [EIFFEL, JORDAN], groups, l, site)[0] for l in (0, 1)}
    for layer, k in keys.items():  # the state holds the keys as they are on the edited model
        torch.testing.assert_close(state.grams[layer], k.T @ k, rtol=1e-12, atol=0)
    leak = {}
    for given in (None, state):
        second = apply_edit(tiny_llama, [LOUVRE], "alphaedit", cfg, progress=False, state=given)
        leak[given is None] = [
            ((u := _as_out_by_key(tiny_llama, int(n.split(".")[1]), upd)) @ keys[int(n.split(".")[1])].T).norm()
            / (u.norm() * keys[int(n.split(".")[1])].norm())
            for n, upd in second.updates
        ]
        if given is not None:
            assert second.key is None and second.state.count == 3
            assert torch.equal(state.grams[0], first.state.grams[0])  # the given state is not mutated
        second.restore()
    assert all(w < 0.1 * wo for w, wo in zip(leak[False], leak[True])), leak
    first.restore()


def test_state_errors_say_what_to_change(corpus, tiny_llama):
    cfg = _config(corpus)
    with pytest.raises(EditError, match="'memit' keeps no state"):
        apply_edit(tiny_llama, EIFFEL, "memit", MEMITConfig(layers=(0, 1), stats=corpus), state=PreviousKeys())
    with pytest.raises(EditError, match="takes a PreviousKeys"):
        apply_edit(tiny_llama, EIFFEL, "alphaedit", cfg, state={"grams": {}})
    original = _weights(tiny_llama)
    stray = PreviousKeys({2: torch.zeros(128, 128, dtype=torch.float64)}, 1)
    with pytest.raises(EditError, match="layers \\[2\\] that this AlphaEdit config does not edit"):
        apply_edit(tiny_llama, EIFFEL, "alphaedit", cfg, state=stray, progress=False)
    assert _same(tiny_llama, original)


# ---------------------------------------------------------------- undo, replay, saving

def test_undo_and_replay_are_bitwise_and_a_saved_edit_keeps_its_state(corpus, tiny_llama, tmp_path):
    original = _weights(tiny_llama)
    result = apply_edit(tiny_llama, [EIFFEL, JORDAN], "alphaedit", _config(corpus), progress=False)
    edited = _weights(tiny_llama)
    assert not _same(tiny_llama, original) and len(result.updates) == 2
    for _ in range(2):
        result.restore()
        assert _same(tiny_llama, original)
        result.apply()
        assert _same(tiny_llama, edited)
    result.restore()
    with pytest.raises(KeyError):
        with edit(tiny_llama, EIFFEL, "alphaedit", _config(corpus), progress=False):
            raise KeyError("boom")
    assert _same(tiny_llama, original)
    loaded = EditResult.load(result.save(tmp_path / "edit.pt"), tiny_llama)
    assert loaded.method == "alphaedit" and loaded.config == result.config
    assert loaded.state.count == 2 and all(torch.equal(loaded.state.grams[l], result.state.grams[l].cpu())
                                           for l in (0, 1))
    with loaded:
        assert _same(tiny_llama, edited)
    assert _same(tiny_llama, original)
    cache = EditCache(tiny_llama, tmp_path / "edits")
    with cache.edit([EIFFEL, JORDAN], "alphaedit", _config(corpus)):
        first = _weights(tiny_llama)
    with cache.edit([EIFFEL, JORDAN], "alphaedit", _config(corpus)) as replayed:
        assert _same(tiny_llama, first) and replayed.state.count == 2
    assert (cache.hits, cache.misses) == (1, 1) and _same(tiny_llama, original)


# ---------------------------------------------------------------- config, registry, CLI

@pytest.mark.parametrize("overrides, needle", [
    ({"nullspace_threshold": 0.0}, "nullspace_threshold must be > 0"),
    ({"nullspace_threshold": -1e-2}, "nullspace_threshold must be > 0"),
    ({"l2": 0.0}, "l2 must be > 0"),
    ({"layers": ()}, "layers is empty"),
    ({"layers": (1, 0)}, "strictly increasing"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_bad_configs_say_what_to_change(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        AlphaEditConfig(**{"layers": (0, 1), **overrides})


def test_layers_out_of_range_are_refused_before_any_weight_changes(corpus, tiny_llama):
    original = _weights(tiny_llama)
    with pytest.raises(ConfigError, match="AlphaEdit edit layer 5 is out of range: the model has 2 layers"):
        apply_edit(tiny_llama, EIFFEL, "alphaedit", _config(corpus, layers=(1, 5)))
    with pytest.raises(ConfigError, match="needs a AlphaEditConfig"):
        apply_edit(tiny_llama, EIFFEL, "alphaedit", MEMITConfig(layers=(0, 1)))
    assert _same(tiny_llama, original)


def test_registry_presets_sadr_and_cli_know_alphaedit(tiny_llama):
    import argparse

    from attention_drift import cli
    from attention_drift.editing import CONFIG_TYPES, EDITORS, METHODS
    from attention_drift.editing.sadr import PUBLISHED, SADRConfig
    from attention_drift.runs.variants import Variant

    assert "alphaedit" in METHODS and CONFIG_TYPES["alphaedit"] is AlphaEditConfig
    assert EDITORS["alphaedit"].state_type is PreviousKeys and EDITORS["memit"].state_type is None
    preset, memit = AlphaEditConfig.for_model(tiny_llama), MEMITConfig.for_model(tiny_llama)
    shared = {f.name for f in dataclasses.fields(AlphaEditConfig)} & {f.name for f in dataclasses.fields(MEMITConfig)}
    assert all(getattr(preset, n) == getattr(memit, n) for n in shared)
    assert AlphaEditConfig(layers=(3,)).nullspace_threshold == 2e-2 and AlphaEditConfig(layers=(3,)).l2 == 10.0
    resolved = SADRConfig().resolved(tiny_llama, "alphaedit")
    assert (resolved.weight, resolved.steps) == PUBLISHED["memit"]
    parser = argparse.ArgumentParser()
    cli.add_variant_arguments(parser)
    variant = cli.variant_from_args(parser.parse_args(["--method", "alphaedit"]))
    assert variant == Variant("alphaedit", "alphaedit")
    config, sadr = variant.resolve(tiny_llama)
    assert isinstance(config, AlphaEditConfig) and sadr is None


def test_smollm2_preset_is_memits_with_the_authors_threshold(monkeypatch):
    import types

    import attention_drift.editing.config as config

    monkeypatch.setattr(config, "model_family", lambda model: "llama")
    monkeypatch.setattr(config, "n_layers", lambda model: 30)
    preset = AlphaEditConfig.for_model(types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=576)))
    entry = config._PRESETS[("llama", 30, 576)]
    assert preset.layers == entry["memit"]["layers"] == (3, 4, 5, 6, 7)
    assert (preset.nullspace_threshold, preset.l2) == (2e-2, 10.0) and preset.stats == entry["stats"]
