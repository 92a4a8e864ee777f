"""ROME / MEMIT / PMET on tiny random models (fast) and on SmolLM2 (slow); AlphaEdit, EMMET, r-ROME and FT in
test_alphaedit.py, test_emmet.py, test_r_rome.py and test_ft.py."""

import dataclasses
import pytest
import torch

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.editing import (
    ConfigError,
    EditCache,
    EditError,
    EditResult,
    MEMITConfig,
    PMETConfig,
    RequestError,
    ROMEConfig,
    StatsConfig,
    apply_edit,
    edit,
    edit_key,
)
from attention_drift.core.runner import LayerRunner, unembed_rows
from attention_drift.editing.optimize import rewriting_batch
from attention_drift.editing.stats import key_second_moments
from attention_drift.editing.sadr import SADRConfig, SADRError

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
LOUVRE = Rewrite("The Louvre is in", "Louvre", "Japan", "Paris")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Statistics from 32 short texts sampled from the (random) model, in a private cache.

    The tiny model's keys have 128 dimensions; 32 x 24 sampled tokens make C well conditioned.
    """
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    return StatsConfig(corpus="model", n_samples=32, seq_len=24)


def _fast(cfg):
    return dataclasses.replace(cfg, steps=6, context_templates=((4, 2), (6, 2)), weight_decay=0.0)


def _weights(model):
    return [b.mlp.out.weight.detach().clone() for b in model.blocks]


def _same(model, weights):
    return all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, weights))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_runner_matches_full_forward(arch):
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch, n_layers=3)
    batch, _, _ = rewriting_batch(model, EIFFEL, ["{}", "Paris is big. {}"])
    runner = LayerRunner(model, batch, 1)
    final, kept = runner.run(keep=(1,))
    rows, pos = torch.meshgrid(torch.arange(len(batch)), torch.arange(batch.input_ids.shape[1]), indexing="ij")
    logits = unembed_rows(model, final[rows.flatten(), pos.flatten()]).reshape(runner.logits.shape)
    real = batch.attention_mask.bool()
    assert torch.allclose(logits[real], runner.logits[real], atol=1e-5, rtol=0)
    # Hooks fire on the blocks the runner calls.
    seen = []
    with model.hooks(fwd_hooks=[("blocks.2.attn.hook_pattern", lambda a, hook: seen.append(a.shape))]):
        runner.run()
    assert seen == [torch.Size([len(batch), model.cfg.n_heads, batch.input_ids.shape[1], batch.input_ids.shape[1]])]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_suffix_runner_matches_the_full_rows_with_a_change_at_the_subject(arch):
    """Running only the positions from the subject's last token on (earlier ones as cached keys /
    values) gives the full run's residuals and attention patterns there, also with a delta added
    at the subject (what the optimisation does); GPT-2's attention falls back to full rows."""
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch, n_layers=3)
    batch, _, subj = rewriting_batch(model, EIFFEL, ["{}", "Paris is big. {}", "A very long prefix here. {}"])
    full = LayerRunner(model, batch, 1)
    part = LayerRunner(model, batch, 1, changes_from=subj)
    assert part.layout == ("packed" if arch == "llama" else "full") and full.layout == "full"
    rows = torch.arange(len(batch))
    delta = torch.randn(model.cfg.d_model)

    def inject(runner):
        at = runner.index(rows, subj)

        def fn(act, hook):
            act = act.clone()
            act[at] += delta
            return act
        return fn

    out = {}
    for name, runner in (("full", full), ("part", part)):
        patterns = []
        hooks = [("blocks.1.mlp.hook_out", inject(runner)),
                 ("blocks.2.attn.hook_pattern", lambda a, hook, r=runner: patterns.append(r.full_pattern(a)))]
        with model.hooks(fwd_hooks=hooks):
            final, _ = runner.run()
        out[name] = (final, patterns[0])
    (final_full, pat_full), (final_part, pat_part) = out["full"], out["part"]
    for r in range(len(batch)):
        n = int(batch.attention_mask[r].sum())
        for q in range(int(subj[r]), n):
            at = part.index(torch.tensor([r]), torch.tensor([q]))
            assert torch.allclose(final_part[at][0], final_full[r, q], atol=1e-5)
            assert torch.allclose(pat_part[r, :, q, :n], pat_full[r, :, q, :n], atol=1e-6)
    if part.layout == "packed":
        assert final_part.shape[0] == part.groups <= len(batch)
        assert final_part.shape[0] * final_part.shape[1] < final_full.shape[1] * len(batch)  # fewer positions run
        assert pat_part[0, :, : int(subj[0])].abs().sum() == 0  # queries before the subject are not run


def _subject_acts(model, request, layer):
    batch = tokens.batch_prompts(model, [request.prompt])
    _, last = tokens.subject_span(model, request.prompt, request.subject)
    _, cache = model.run_with_cache(
        batch.input_ids, names_filter=lambda n: n in (f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.mlp.hook_out")
    )
    return cache[f"blocks.{layer}.mlp.hook_post"][0, last], cache[f"blocks.{layer}.mlp.hook_out"][0, last]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_maps_subject_key_to_optimised_value(arch, corpus):
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch, n_layers=3)
    cfg = _fast(ROMEConfig(layer=1, stats=corpus))
    key, before = _subject_acts(model, EIFFEL, 1)
    result = apply_edit(model, EIFFEL, "rome", cfg, progress=False)
    trace = result.traces[0]
    site = "blocks.1.mlp.hook_out"
    v_star = trace.init[site] + trace.delta[site]
    key_after, after = _subject_acts(model, EIFFEL, 1)
    assert torch.equal(key, key_after)  # the key is computed below the edited projection
    assert torch.allclose(trace.init[site], before, atol=1e-6)
    assert trace.delta[site].norm() > 1e-3
    assert torch.allclose(after, v_star, atol=1e-4), (after - v_star).norm()
    # Other keys of the statistics move little: E|dW k|^2 over corpus keys << |dW k*|^2.
    delta = result.deltas["blocks.1.mlp.out.weight"]
    delta = delta.T if delta.shape[0] != model.cfg.d_model else delta  # Conv1D layout
    cov = key_second_moments(model, [1], corpus, progress=False)[1].double()
    spread = torch.trace(delta.double() @ cov @ delta.double().T)
    assert spread < 0.05 * (delta.double() @ key.double()).norm() ** 2
    result.restore()


@pytest.mark.parametrize("method", ["rome", "memit", "pmet"])
def test_undo_is_bitwise_exact_also_after_an_exception(method, corpus, tiny_llama):
    model = tiny_llama
    cfg = {"rome": ROMEConfig(layer=1, stats=corpus), "memit": MEMITConfig(layers=(0, 1), stats=corpus),
           "pmet": PMETConfig(layers=(0, 1), stats=corpus)}[method]
    cfg = _fast(cfg)
    original = _weights(model)
    requests = EIFFEL if method == "rome" else [EIFFEL, JORDAN]
    with edit(model, requests, method, cfg) as result:
        assert not _same(model, original)
        assert set(result.deltas) == {f"blocks.{l}.mlp.out.weight" for l in result.layers}
        for name, delta in result.deltas.items():
            layer = int(name.split(".")[1])
            assert torch.equal(model.blocks[layer].mlp.out.weight, original[layer] + delta) or torch.allclose(
                model.blocks[layer].mlp.out.weight, original[layer] + delta, atol=1e-7)
    assert _same(model, original) and result.restored
    with pytest.raises(KeyError):
        with edit(model, requests, method, cfg):
            assert not _same(model, original)
            raise KeyError("boom")
    assert _same(model, original)
    result = apply_edit(model, requests, method, cfg, progress=False)
    result.restore()
    result.restore()
    assert _same(model, original)


def test_memit_batch_update_has_rank_of_the_batch(corpus, tiny_llama):
    cfg = _fast(MEMITConfig(layers=(0, 1), stats=corpus))
    with edit(tiny_llama, [EIFFEL, JORDAN, LOUVRE], "memit", cfg) as result:
        assert len(result.traces) == 3 and len(result.loss_trace) == 3
        for delta in result.deltas.values():
            assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 3


def test_rome_applies_several_requests_in_turn(corpus, tiny_llama):
    cfg = _fast(ROMEConfig(layer=1, stats=corpus))
    with edit(tiny_llama, [EIFFEL, JORDAN], "rome", cfg) as result:
        assert len(result.traces) == 2
        assert torch.linalg.matrix_rank(result.deltas["blocks.1.mlp.out.weight"].double(), atol=1e-6) == 2


BAD = {
    "subject tokenises to nothing": (Rewrite("The Eiffel Tower is located in", "", "Rome", "Paris"), {}),
    "subject not in prompt": (Rewrite("The Eiffel Tower is located in", "Louvre", "Rome", "Paris"), {}),
    "empty target": (Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "  ", "Paris"), {}),
    "layer out of range": (EIFFEL, {"layer": 7}),
    "negative layer": (EIFFEL, {"layer": -1}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_any_weight_is_touched(case, tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path))
    request, overrides = BAD[case]
    cfg = ROMEConfig(**{"layer": 1, **overrides})
    original = _weights(tiny_llama)
    with pytest.raises(EditError) as err:
        with edit(tiny_llama, request, "rome", cfg):
            pytest.fail("the body must not run")
    assert isinstance(err.value, ValueError)
    assert _same(tiny_llama, original)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing was computed either
    message = str(err.value)
    assert ("layer" in message) if "layer" in case else ("subject" in message or "target" in message)


def test_bad_configs_and_methods(tiny_llama):
    from attention_drift.core.models import tiny_model

    with pytest.raises(ConfigError, match="ROMEConfig\\(layer="):
        ROMEConfig.for_model(tiny_model("llama", n_layers=3))  # no preset for this shape
    with pytest.raises(ConfigError, match="unknown editing method"):
        edit(tiny_llama, EIFFEL, "fine-tune", ROMEConfig(layer=0)).__enter__()
    with pytest.raises(ConfigError, match="needs a MEMITConfig"):
        apply_edit(tiny_llama, EIFFEL, "memit", ROMEConfig(layer=0))
    with pytest.raises(ConfigError, match="strictly increasing"):
        MEMITConfig(layers=(3, 1))
    with pytest.raises(RequestError, match="Rewrite"):
        apply_edit(tiny_llama, "The Eiffel Tower is located in Rome", "rome", ROMEConfig(layer=0))


class AttentionToSubject:
    """Toy extra loss: pushes attention from the last prompt token to the subject's last token."""

    name = "toy"

    def __init__(self, weight: float):
        self.weight, self.record, self.seen = weight, {}, []

    def hook_names(self, info):
        return [f"blocks.{l}.attn.hook_pattern" for l in range(info.n_layers)]

    def __call__(self, step, acts, info):
        rows = torch.arange(info.n_rewriting)
        q, k = info.last_prompt_index[rows], info.subject_last_index[rows]
        self.seen.append({name: (a.shape, a.requires_grad) for name, a in acts.items()})
        if step == 0:
            self.record["reference"] = acts[f"blocks.{info.n_layers - 1}.attn.hook_pattern"].detach()
        top = acts[f"blocks.{info.n_layers - 1}.attn.hook_pattern"][rows, :, q, k]
        return -self.weight * top.mean()


def test_extra_loss_sees_live_patterns_and_reaches_the_delta(corpus):
    from attention_drift.core.models import tiny_model

    model = tiny_model("llama", n_layers=3)
    cfg = _fast(ROMEConfig(layer=1, stats=corpus))
    term = AttentionToSubject(50.0)
    with edit(model, EIFFEL, "rome", cfg, extra_losses=[term]) as result:
        with_term = result.traces[0]
    with edit(model, EIFFEL, "rome", cfg) as result_plain:
        plain = result_plain.traces[0]
    n_rows = 1 + 4 + 1  # bare prompt, 4 prefixed, essence
    first = term.seen[0]
    assert set(first) == {f"blocks.{l}.attn.hook_pattern" for l in range(3)}
    shape, live = first["blocks.2.attn.hook_pattern"]
    assert shape[0] == n_rows and shape[1] == model.cfg.n_heads and live  # above the delta: differentiable
    assert not first["blocks.0.attn.hook_pattern"][1]  # below the edit layer: a constant
    assert not first["blocks.1.attn.hook_pattern"][1]  # the delta enters after this attention
    assert len(result.extra_trace["toy"][0]) == with_term.steps_run
    assert "reference" in with_term.records["toy"]
    site = "blocks.1.mlp.hook_out"
    assert not torch.allclose(with_term.delta[site], plain.delta[site])
    # The term lowered its own value: the gradient reached the delta.
    assert with_term.extra["toy"][-1] < with_term.extra["toy"][0]


class WrongShape:
    name = "bad"

    def hook_names(self, info):
        return ["blocks.1.hook_resid_post"]

    def __call__(self, step, acts, info):
        return acts["blocks.1.hook_resid_post"]


def test_extra_loss_must_be_scalar_and_model_is_restored(corpus, tiny_llama):
    original = _weights(tiny_llama)
    with pytest.raises(EditError, match="scalar"):
        apply_edit(tiny_llama, EIFFEL, "rome", _fast(ROMEConfig(layer=1, stats=corpus)), extra_losses=[WrongShape()])
    assert _same(tiny_llama, original)


# ---------------------------------------------------------------- re-entry, saving, caching

def _config(method, corpus, **overrides):
    base = {"rome": ROMEConfig(layer=1, stats=corpus), "memit": MEMITConfig(layers=(0, 1), stats=corpus),
            "pmet": PMETConfig(layers=(0, 1), stats=corpus)}[method]
    return dataclasses.replace(_fast(base), **overrides)


@pytest.mark.parametrize("arch, method", [("llama", "rome"), ("llama", "memit"), ("llama", "pmet"), ("gpt2", "rome")])
def test_restore_and_apply_again_are_bitwise_every_time(arch, method, corpus):
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch, n_layers=3)
    original = _weights(model)
    requests = [EIFFEL, JORDAN]  # ROME: two updates of one layer, in turn
    result = apply_edit(model, requests, method, _config(method, corpus), progress=False)
    edited = _weights(model)
    assert not _same(model, original)
    assert len(result.updates) == 2  # ROME: one per request; MEMIT / PMET: one per layer
    for _ in range(3):
        result.restore()
        assert _same(model, original) and result.restored
        result.apply()
        assert _same(model, edited) and not result.restored
    result.apply()  # applied already: nothing changes
    assert _same(model, edited)
    result.restore()
    for _ in range(2):
        with result as entered:
            assert entered is result and _same(model, edited)
        assert _same(model, original)


def test_apply_refuses_weights_another_edit_changed(corpus, tiny_llama):
    result = apply_edit(tiny_llama, EIFFEL, "rome", _config("rome", corpus), progress=False)
    result.restore()
    other = apply_edit(tiny_llama, JORDAN, "rome", _config("rome", corpus), progress=False)
    with pytest.raises(EditError, match="no longer hold"):
        result.apply()
    other.restore()
    result.apply()
    result.restore()


def test_saved_edit_loads_and_replays_bitwise(corpus, tmp_path, tiny_llama):
    from attention_drift.core.models import tiny_model

    sadr = SADRConfig(weight=1.0, selection="all", steps=4)
    result = apply_edit(tiny_llama, [EIFFEL, JORDAN], "memit", _config("memit", corpus), sadr=sadr, progress=False)
    edited = _weights(tiny_llama)
    path = result.save(tmp_path / "edit.pt")
    result.restore()
    original = _weights(tiny_llama)

    loaded = EditResult.load(path, tiny_llama)
    assert loaded.restored and _same(tiny_llama, original)
    with loaded:
        assert _same(tiny_llama, edited)
    assert _same(tiny_llama, original)
    assert (loaded.method, loaded.requests, loaded.config, loaded.sadr, loaded.layers, loaded.key) == (
        result.method, result.requests, result.config, result.sadr, result.layers, result.key)
    assert loaded.config.stats == corpus and isinstance(loaded.config.stats, StatsConfig)
    assert all(torch.equal(loaded.deltas[n], d) for n, d in result.deltas.items())
    assert loaded.loss_trace == result.loss_trace and loaded.extra_trace == result.extra_trace
    assert all(torch.equal(a, b) for a, b in zip(loaded.sadr_records[0]["mask"], result.sadr_records[0]["mask"]))
    site = "blocks.1.hook_resid_post"
    assert torch.equal(loaded.traces[1].delta[site], result.traces[1].delta[site])

    with result:  # the model holds another edit now: the saved one was made on other weights
        with pytest.raises(EditError, match="other weights"):
            EditResult.load(path, tiny_llama)
    with pytest.raises(EditError, match="another model"):
        EditResult.load(path, tiny_model("gpt2", n_layers=3))


def test_edit_key_covers_the_resolved_configuration(corpus, tiny_llama):
    cfg = _config("rome", corpus)
    key = edit_key(tiny_llama, "rome", cfg)
    assert len(key) == 64 and key == edit_key(tiny_llama, "rome", dataclasses.replace(cfg))
    changed = [
        dataclasses.replace(cfg, steps=7),
        dataclasses.replace(cfg, template_seed=1),
        dataclasses.replace(cfg, context_templates=((4, 3),)),
        dataclasses.replace(cfg, stats=dataclasses.replace(corpus, n_samples=33)),
    ]
    assert len({key, *(edit_key(tiny_llama, "rome", c) for c in changed)}) == 1 + len(changed)
    with_sadr = edit_key(tiny_llama, "rome", cfg, SADRConfig())
    assert with_sadr != key
    assert with_sadr == edit_key(tiny_llama, "rome", cfg, SADRConfig(weight=0.01, steps=80))  # resolved alike
    assert with_sadr != edit_key(tiny_llama, "rome", cfg, SADRConfig(steps=40))
    assert edit_key(tiny_llama, "memit", _config("memit", corpus)) != key
    result = apply_edit(tiny_llama, EIFFEL, "rome", cfg, progress=False)
    result.restore()
    assert result.key == key


def _tiny_preset(monkeypatch, corpus, **rome):
    from attention_drift.editing import config as config_module

    monkeypatch.setitem(config_module._PRESETS, ("llama", 3, 64), {
        "rome": dict(layer=1, steps=4, context_templates=((4, 2),), weight_decay=0.0, **rome),
        "memit": dict(layers=(0, 1)), "pmet": dict(layers=(0, 1)), "stats": corpus,
    })


def test_cache_replays_a_stored_edit_bitwise_and_a_changed_preset_misses(corpus, tmp_path, monkeypatch):
    from attention_drift.core.models import tiny_model

    model = tiny_model("llama", n_layers=3)
    _tiny_preset(monkeypatch, corpus)
    original = _weights(model)
    cache = EditCache(model, tmp_path / "edits")
    with cache.edit(EIFFEL) as first:  # config None: the (patched) preset
        stored = _weights(model)
    assert (cache.hits, cache.misses) == (0, 1) and _same(model, original)
    path = cache.path(EIFFEL)
    assert path.is_file() and (path.parent / "edit.json").is_file()

    with apply_edit(model, EIFFEL, "rome", ROMEConfig.for_model(model), progress=False):
        fresh = _weights(model)
    assert all(torch.equal(a, b) for a, b in zip(stored, fresh))

    for cache_now in (cache, EditCache(model, tmp_path / "edits")):  # this one, and a later process's
        with cache_now.edit([EIFFEL]) as replayed:
            assert _same(model, fresh)
        assert cache_now.hits == 1 and _same(model, original)
        assert replayed.loss_trace == first.loss_trace and replayed.key == first.key

    _tiny_preset(monkeypatch, corpus, lr=0.25)
    assert cache.path(EIFFEL) != path
    with cache.edit(EIFFEL) as changed:
        assert not _same(model, fresh)
    assert (cache.hits, cache.misses) == (1, 2) and changed.config.lr == 0.25


def test_cache_keys_requests_and_sadr_protocol(corpus, tmp_path, monkeypatch, tiny_llama):
    from attention_drift.editing import sadr as sadr_module
    from attention_drift.core.data import load_example

    cache = EditCache(tiny_llama, tmp_path)
    cfg = _config("rome", corpus)
    sadr = SADRConfig(selection="all", steps=3)
    with cache.edit(EIFFEL, "rome", cfg, sadr=sadr):
        pass
    with cache.edit(JORDAN, "rome", cfg, sadr=sadr):
        pass
    with cache.edit(EIFFEL, "rome", cfg, sadr=sadr) as result:
        assert result.sadr == SADRConfig(weight=0.01, selection="all", steps=3)
    assert (cache.hits, cache.misses) == (1, 2)
    monkeypatch.setitem(sadr_module.PUBLISHED, "rome", (0.02, 80))  # another published weight: not the stored edit
    with cache.edit(EIFFEL, "rome", cfg, sadr=sadr) as result:
        assert result.sadr.weight == 0.02
    assert (cache.hits, cache.misses) == (1, 3)
    record = load_example()[0]
    assert cache.path(record, "rome", cfg) == cache.path(record.rewrite, "rome", cfg)
    with pytest.raises(RequestError, match="a Record, a Rewrite or a non-empty sequence"):
        cache.path("The Eiffel Tower", "rome", cfg)


# ---------------------------------------------------------------- the editor registry

@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """A toy editor: each request adds ``factor`` times the current weight of ``layer``."""

    layer: int
    factor: float = 0.5
    steps: int = 1
    outside: bool = False

    method = "toy"

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, model) -> None:
        if not 0 <= self.layer < model.cfg.n_layers:
            raise ConfigError(f"toy layer {self.layer} is out of range")

    @classmethod
    def for_model(cls, model) -> "ToyConfig":
        return cls(layer=model.cfg.n_layers - 1)


def _toy_prepare(model, config, *, progress=True):
    from attention_drift.core.hooks import mlp_weight_name

    return {"weight_name": mlp_weight_name(config.layer + config.outside)}


def _toy_execute(model, requests, config, prepared, apply, extra_losses):
    from attention_drift.core.models import mlp_out_weight

    for _ in requests:
        apply(prepared["weight_name"], config.factor * mlp_out_weight(model, config.layer).detach())
    return []


@pytest.fixture
def toy_editor():
    from attention_drift.editing import Editor, register, unregister

    editor = register(Editor("toy", ToyConfig, _toy_prepare, _toy_execute))
    yield editor
    unregister("toy")


def test_a_registered_editor_runs_through_apply_edit_and_leaves_again(toy_editor, tiny_llama):
    from attention_drift.editing import CONFIG_TYPES, EDITORS, METHODS

    assert EDITORS["toy"] is toy_editor and "toy" in METHODS
    assert tuple(METHODS) == ("rome", "memit", "pmet", "alphaedit", "emmet", "r-rome", "ft", "toy") and CONFIG_TYPES["toy"] is ToyConfig
    original = _weights(tiny_llama)
    with edit(tiny_llama, [EIFFEL, JORDAN], "toy") as result:  # config None: ToyConfig.for_model
        assert result.method == "toy" and result.layers == (1,) and len(result.updates) == 2
        assert torch.equal(tiny_llama.blocks[1].mlp.out.weight, (original[1] * 1.5) * 1.5)
        assert torch.equal(tiny_llama.blocks[0].mlp.out.weight, original[0])
        edited = _weights(tiny_llama)
    assert _same(tiny_llama, original)
    with result:
        assert _same(tiny_llama, edited)
    assert result.key == edit_key(tiny_llama, "toy", ToyConfig(layer=1))
    with pytest.raises(ConfigError, match="needs a ToyConfig"):
        apply_edit(tiny_llama, EIFFEL, "toy", ROMEConfig(layer=0))
    with pytest.raises(SADRError, match="no published SADR weight"):
        apply_edit(tiny_llama, EIFFEL, "toy", sadr=SADRConfig())
    with pytest.raises(EditError, match="not among the parameters"):
        apply_edit(tiny_llama, EIFFEL, "toy", ToyConfig(layer=0, outside=True))
    assert _same(tiny_llama, original)


def test_registry_checks_editors_and_forgets_removed_ones(tiny_llama):
    from attention_drift.editing import EDITORS, METHODS, Editor, register, unregister

    with pytest.raises(ConfigError, match="registered already"):
        register(Editor("rome", ROMEConfig, _toy_prepare, _toy_execute))
    with pytest.raises(ConfigError, match="method is 'toy'"):
        register(Editor("toy2", ToyConfig, _toy_prepare, _toy_execute))
    with pytest.raises(ConfigError, match="frozen dataclass"):
        register(Editor("toy", dict, _toy_prepare, _toy_execute))
    with pytest.raises(ConfigError, match="state_type must be a dataclass"):
        register(Editor("toy", ToyConfig, _toy_prepare, _toy_execute, state_type=dict))
    register(Editor("toy", ToyConfig, _toy_prepare, _toy_execute))
    unregister("toy")
    assert "toy" not in EDITORS and "toy" not in METHODS and list(EDITORS) == ["rome", "memit", "pmet", "alphaedit", "emmet", "r-rome", "ft"]
    with pytest.raises(ConfigError, match="unknown editing method 'toy'; choose one of rome, memit, pmet, alphaedit, emmet, r-rome, ft"):
        apply_edit(tiny_llama, EIFFEL, "toy", ToyConfig(layer=0))


# ---------------------------------------------------------------- rollback when an editor fails mid-edit

def _snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _bitwise_as(model, snapshot) -> bool:
    """Every parameter of the model (not only the MLP projections) holds exactly its snapshot."""
    params = dict(model.named_parameters())
    return params.keys() == snapshot.keys() and all(torch.equal(params[n], w) for n, w in snapshot.items())


FAILURES = {
    "library-error": lambda: EditError("toy editor: the request cannot be inserted"),
    "other-error": lambda: RuntimeError("toy editor: a bug"),
    "interrupt": KeyboardInterrupt,  # Ctrl-C in the middle of an edit
}
RAISED: list[BaseException] = []


@dataclasses.dataclass(frozen=True)
class FailingConfig(ToyConfig):
    """The toy editor that writes one update and then raises ``FAILURES[error]``."""

    error: str = "library-error"
    method = "failing"


def _failing_execute(model, requests, config, prepared, apply, extra_losses):
    from attention_drift.core.models import mlp_out_weight

    weight = mlp_out_weight(model, config.layer)
    before = weight.detach().clone()
    apply(prepared["weight_name"], torch.ones_like(weight))
    assert not torch.equal(weight, before)  # the write is in the model when the editor fails
    RAISED.append(FAILURES[config.error]())
    raise RAISED[-1]


@pytest.mark.parametrize("error", list(FAILURES))
def test_an_editor_that_fails_after_writing_leaves_every_weight_bitwise(error, tiny_llama):
    """A registered editor writes a weight through apply() and then raises: the model holds exactly its
    old parameters again (all of them, bitwise), and the editor's own error reaches the caller as it
    was raised (the library's EditError with its message; anything else unchanged, not masked)."""
    from attention_drift.editing import Editor, register, unregister
    from attention_drift.core.errors import AttentionDriftError

    register(Editor("failing", FailingConfig, _toy_prepare, _failing_execute))
    try:
        snapshot = _snapshot(tiny_llama)
        kind = type(FAILURES[error]())
        for requests, layer in (([EIFFEL, JORDAN], 1), (EIFFEL, 0)):
            RAISED.clear()
            with pytest.raises(kind) as err:
                with edit(tiny_llama, requests, "failing", FailingConfig(layer=layer, error=error), progress=False):
                    pytest.fail("the body must not run")
            assert RAISED and err.value is RAISED[-1]
            assert isinstance(err.value, AttentionDriftError) == (error == "library-error")
            assert _bitwise_as(tiny_llama, snapshot)
    finally:
        unregister("failing")


def _fail_on_call(monkeypatch, module, name: str, n: int, error, check=None):
    """Patch ``module.name`` to run as usual except on its ``n``-th call, which (after ``check(*args,
    **kwargs)``) raises ``error``; returns the list of calls seen."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == n:
            if check is not None:
                check(*args, **kwargs)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_rome_failing_on_the_second_request_inside_the_sadr_loss_restores_bitwise(corpus, monkeypatch):
    """ROME applies two requests in turn; the SADR loss term raises at the third step of the second
    request's optimisation, after the first request's update is in the model."""
    from attention_drift.editing import sadr as sadr_module
    from attention_drift.core.models import tiny_model

    model = tiny_model("llama", n_layers=3)
    snapshot = _snapshot(model)
    steps = 6
    written = []
    error = SADRError("SADR: no attention rows")
    calls = _fail_on_call(monkeypatch, sadr_module, "sadr_loss", steps + 3, error,
                          check=lambda *a, **k: written.append(not _bitwise_as(model, snapshot)))
    with pytest.raises(SADRError) as err:
        apply_edit(model, [EIFFEL, JORDAN], "rome", _config("rome", corpus),
                   sadr=SADRConfig(weight=1.0, selection="all", steps=steps), progress=False)
    assert err.value is error and written == [True] and len(calls) == steps + 3
    assert _bitwise_as(model, snapshot)


def test_memit_failing_on_its_second_layer_restores_bitwise(corpus, monkeypatch):
    """MEMIT writes its layers in turn; the least-squares solve of the second layer fails (a singular
    system) after the first layer's update is in the model."""
    from attention_drift.editing import memit
    from attention_drift.core.models import tiny_model

    model = tiny_model("llama", n_layers=3)
    snapshot = _snapshot(model)
    first_layer = model.blocks[0].mlp.out.weight
    written = []
    error = torch.linalg.LinAlgError("linalg.solve: the system is singular")
    calls = _fail_on_call(monkeypatch, memit, "least_squares_update", 2, error,
                          check=lambda model_, layer, *a: written.append((layer, not torch.equal(
                              first_layer, snapshot[next(n for n, p in model.named_parameters() if p is first_layer)]))))
    with pytest.raises(torch.linalg.LinAlgError) as err:
        apply_edit(model, [EIFFEL, JORDAN], "memit", _config("memit", corpus), progress=False)
    assert err.value is error and written == [(1, True)] and len(calls) == 2
    assert _bitwise_as(model, snapshot)


def test_a_failure_in_the_verify_fallback_stage_restores_bitwise(corpus, monkeypatch):
    """SADR+ with verify on two requests that contradict each other (same prompt, swapped targets:
    they can never both hold, so the real check sends the edit to its fallbacks); the plain fallback
    stage writes its first request's update, then its second request's optimisation fails."""
    from attention_drift.editing import rome
    from attention_drift.core.models import tiny_model
    from attention_drift.editing.sadr import SADRLoss

    model = tiny_model("llama", n_layers=3)
    snapshot = _snapshot(model)
    back = Rewrite(JORDAN.prompt, JORDAN.subject, JORDAN.target_true, JORDAN.target_new)
    seen = []

    def check(model_, request, *args, extra_losses=(), **kwargs):
        seen.append((request, any(isinstance(t, SADRLoss) for t in extra_losses), not _bitwise_as(model, snapshot)))

    error = RuntimeError("out of memory in the fallback stage")
    _fail_on_call(monkeypatch, rome, "optimize_values", 4, error, check=check)
    sadr = SADRConfig(weight=0.0, steps=6, distract=True, output_weight=1.0, output="contrast", verify=True)
    with pytest.raises(RuntimeError) as err:
        apply_edit(model, [JORDAN, back], "rome", _config("rome", corpus), sadr=sadr, progress=False)
    # call 4: the plain stage (no SADR term), its second request, with the first one's update written
    assert err.value is error and seen == [(back, False, True)]
    assert _bitwise_as(model, snapshot)
    with edit(model, [JORDAN, back], "rome", _config("rome", corpus), sadr=sadr, progress=False) as result:
        assert result.fallback == "plain-clamp2"  # unpatched: every stage fails the check, the last is kept
    assert _bitwise_as(model, snapshot)


def test_default_steps_match_the_papers_baselines():
    assert ROMEConfig(layer=0).steps == MEMITConfig(layers=(0,)).steps == PMETConfig(layers=(0,)).steps == 20


# ---------------------------------------------------------------- real model (slow)

def _probs(model, prompts, targets):
    batch = tokens.batch_with_targets(model, prompts, targets)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    return tokens.target_log_probs(logits, batch).exp()


def _wins(model, request):
    p = _probs(model, [request.prompt, request.prompt], [request.target_new, request.target_true])
    return bool(p[0] > p[1])


REAL = [  # facts SmolLM2-135M knows before the edit (the tests check it)
    Rewrite("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    Rewrite("The Colosseum is located in the city of", "Colosseum", "London", "Rome"),
    Rewrite("Mount Everest is located in", "Mount Everest", "Brazil", "Nepal"),
]
UNRELATED = ("The capital of Japan is", "Tokyo")
# 4096 tokens: enough for a full-rank C (d_mlp 1536) and quick to sample; fewer ROME prefixes
# than the preset keep the test short (the preset's quality is measured by the benchmarks).
SLOW_STATS = StatsConfig(n_samples=64, seq_len=64)


@pytest.mark.slow
def test_rome_on_smollm2_rewrites_and_keeps_an_unrelated_fact(smollm2):
    cfg = dataclasses.replace(ROMEConfig.for_model(smollm2), stats=SLOW_STATS, context_templates=((5, 5),))
    unrelated_before = _probs(smollm2, [UNRELATED[0]], [UNRELATED[1]])[0]
    for request in REAL[:2]:
        assert not _wins(smollm2, request)
        with edit(smollm2, request, "rome", cfg):
            assert _wins(smollm2, request)
            unrelated = _probs(smollm2, [UNRELATED[0]], [UNRELATED[1]])[0]
            assert abs(float(unrelated - unrelated_before)) < 0.1
        assert not _wins(smollm2, request)


@pytest.mark.slow
def test_memit_on_smollm2_edits_a_batch_of_three(smollm2):
    cfg = dataclasses.replace(MEMITConfig.for_model(smollm2), stats=SLOW_STATS)
    unrelated_before = _probs(smollm2, [UNRELATED[0]], [UNRELATED[1]])[0]
    assert not any(_wins(smollm2, r) for r in REAL)
    with edit(smollm2, REAL, "memit", cfg) as result:
        assert len(result.traces) == 3
        assert all(_wins(smollm2, r) for r in REAL)
        unrelated = _probs(smollm2, [UNRELATED[0]], [UNRELATED[1]])[0]
        assert abs(float(unrelated - unrelated_before)) < 0.1


def _params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _all_bitwise(model, saved: dict) -> bool:
    now = dict(model.named_parameters())
    return now.keys() == saved.keys() and all(torch.equal(now[n], w) for n, w in saved.items())


@pytest.mark.slow
def test_pmet_on_smollm2_raises_the_target_probability_and_undo_is_bitwise(smollm2):
    """PMET (preset layers 3-7) on a fact SmolLM2 knows: the new target's probability rises many
    times over and wins against the old one; on exit every parameter is bitwise what it was."""
    request = REAL[0]
    # the first 32 sequences of the corpus shipped with the package: statistics without sampling
    cfg = dataclasses.replace(PMETConfig.for_model(smollm2), stats=StatsConfig(n_samples=32, seq_len=128))
    saved = _params(smollm2)
    before = _probs(smollm2, [request.prompt] * 2, [request.target_new, request.target_true])
    assert before[0] < 0.01 < before[1]
    with edit(smollm2, request, "pmet", cfg) as result:
        assert result.layers == (3, 4, 5, 6, 7) and len(result.updates) == 5
        after = _probs(smollm2, [request.prompt] * 2, [request.target_new, request.target_true])
        assert after[0] > 10 * before[0] and after[0] > after[1]
        assert not _all_bitwise(smollm2, saved)
    assert _all_bitwise(smollm2, saved)
    assert torch.equal(_probs(smollm2, [request.prompt] * 2, [request.target_new, request.target_true]), before)


@pytest.mark.slow
def test_rome_on_gemma3_rewrites_and_undo_is_bitwise(gemma3):
    """ROME with Gemma-3-270M's preset (layer 3) makes the new target win on a fact the model knows
    and changes only that layer's MLP output projection; on exit every parameter is bitwise back.
    Without the covariance adjustment (u = k*): no corpus is shipped for Gemma-3, and sampling one
    takes minutes on a CPU; the optimisation and the update are ROME's."""
    request = REAL[0]
    cfg = dataclasses.replace(ROMEConfig.for_model(gemma3), mom2_adjustment=False, context_templates=((5, 2),))
    saved = _params(gemma3)
    assert not _wins(gemma3, request)
    with edit(gemma3, request, "rome", cfg) as result:
        assert _wins(gemma3, request)
        changed = [n for n, p in gemma3.named_parameters() if not torch.equal(p, saved[n])]
        assert len(changed) == 1 and ".layers.3." in changed[0] and "down_proj" in changed[0]
        assert result.deltas["blocks.3.mlp.out.weight"].norm() > 0
    assert _all_bitwise(gemma3, saved)
    assert not _wins(gemma3, request)
