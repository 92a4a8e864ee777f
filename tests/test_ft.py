"""FT (FT-L, constrained fine-tuning of one MLP output projection) on tiny random models: the
L-infinity constraint, the edit itself, what changes and what is undone, SADR / SADR+ on the
fine-tuned weights, the authors' loop as a reference, frozen numbers, presets, registry and CLI."""

import dataclasses
import math
import types

import pytest
import torch

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import act_name, mlp_weight_name
from attention_drift.core.models import mlp_out_weight, tiny_model
from attention_drift.core.scores import score_pairs
from attention_drift.editing import (
    ConfigError,
    EditCache,
    EditResult,
    FTConfig,
    ROMEConfig,
    apply_edit,
    edit,
)
from attention_drift.editing.optimize import rewriting_batch
from attention_drift.editing.sadr import SADRConfig, SADRLoss

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
# the tiny random models' weights are ~0.01-0.02; lr 1e-2 moves them visibly in a few steps
FAST = dict(lr=1e-2, steps=10)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _unchanged_but(model, snapshot, changed: set[str]) -> set[str]:
    """Names of the parameters that differ from ``snapshot`` (must be exactly ``changed``)."""
    return {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])} ^ changed


def _log_p_new(model, request) -> float:
    with torch.no_grad():
        return score_pairs(model, [request.prompt], [request.target_new], [request.target_true]).log_p_right.item()


# ---------------------------------------------------------------- the constraint

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_linf_constraint_holds_and_binds(arch):
    model = tiny_model(arch)
    eps = 1e-3
    w0 = mlp_out_weight(model, 1).detach().clone()
    free = apply_edit(model, EIFFEL, "ft", FTConfig(layer=1, norm_constraint=None, **FAST), progress=False)
    free.restore()
    assert free.deltas[mlp_weight_name(1)].abs().max() > 5 * eps  # unconstrained, it goes far beyond the ball
    result = apply_edit(model, EIFFEL, "ft", FTConfig(layer=1, norm_constraint=eps, **FAST), progress=False)
    ((name, update),) = result.updates
    assert name == mlp_weight_name(1)
    assert update.abs().max() <= eps  # the change handed to apply: exactly inside the ball
    at_bound = (update.abs() == torch.tensor(eps, dtype=update.dtype)).float().mean()
    assert at_bound > 0.1  # the clamp is active on many weights
    change = mlp_out_weight(model, 1).detach() - w0  # the stored weights: W0 + D, rounded
    assert change.abs().max() <= eps + torch.finfo(torch.float32).eps * w0.abs().max()
    result.restore()


def test_several_requests_share_one_ball_around_the_weights_before_the_edit(tiny_llama):
    eps = 1e-3
    w0 = mlp_out_weight(tiny_llama, 0).detach().clone()
    with edit(tiny_llama, [EIFFEL, JORDAN], "ft", FTConfig(layer=0, norm_constraint=eps, **FAST),
              progress=False) as result:
        assert len(result.updates) == 2 and len(result.traces) == 2  # one fine-tuning per request
        total = result.updates[0][1] + result.updates[1][1]
        assert total.abs().max() <= eps * (1 + 1e-6)
        assert (mlp_out_weight(tiny_llama, 0) - w0).abs().max() <= eps + 1e-7
        assert result.updates[1][1].abs().max() > 0  # the second request still moved some weights
    assert torch.equal(mlp_out_weight(tiny_llama, 0), w0)


# ---------------------------------------------------------------- the edit

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_edit_raises_the_new_targets_probability_on_the_prompt(arch):
    model = tiny_model(arch)
    before = _log_p_new(model, EIFFEL)
    with edit(model, EIFFEL, "ft", FTConfig(layer=0, norm_constraint=1e-2, **FAST), progress=False) as result:
        after = _log_p_new(model, EIFFEL)
    trace = result.traces[0]
    assert after > before + 0.1, (before, after)
    assert trace.steps_run == 10 and trace.target_prob[-1] > trace.target_prob[0]
    assert trace.loss == trace.nll  # no extra terms: the loss is the target NLL
    assert math.isclose(trace.target_prob[0], math.exp(-trace.nll[0]), rel_tol=1e-6)


def test_only_the_layers_weights_change_and_undo_replay_save_are_bitwise(tiny_llama, tmp_path):
    snapshot = _params(tiny_llama)
    config = FTConfig(layer=1, norm_constraint=2e-3, **FAST)
    result = apply_edit(tiny_llama, [EIFFEL, JORDAN], "ft", config, progress=False)
    edited = _params(tiny_llama)
    (name,) = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, snapshot[n])}
    assert mlp_out_weight(tiny_llama, 1) is dict(tiny_llama.named_parameters())[name]
    assert not any(p.requires_grad for p in tiny_llama.parameters())  # the one tuned weight is frozen again
    assert result.layers == (1,) and result.key is not None and result.config == config
    assert torch.equal(result.deltas[mlp_weight_name(1)], mlp_out_weight(tiny_llama, 1).detach() - snapshot[name])
    result.restore()
    assert not _unchanged_but(tiny_llama, snapshot, set())
    with result:
        assert not _unchanged_but(tiny_llama, edited, set())
    assert not _unchanged_but(tiny_llama, snapshot, set())
    loaded = EditResult.load(result.save(tmp_path / "ft.pt"), tiny_llama)
    with loaded:
        assert not _unchanged_but(tiny_llama, edited, set())
    cache = EditCache(tiny_llama, tmp_path / "cache")
    with cache.edit(EIFFEL, "ft", config) as first:
        once = _params(tiny_llama)
    with cache.edit(EIFFEL, "ft", config) as again:  # replayed from the disk
        assert not _unchanged_but(tiny_llama, once, set())
    assert first.key == again.key
    assert not _unchanged_but(tiny_llama, snapshot, set())


def test_a_bfloat16_model_is_tuned_with_a_float32_change():
    model = tiny_model("llama", dtype=torch.bfloat16)
    w0 = mlp_out_weight(model, 0).detach().clone()
    with edit(model, EIFFEL, "ft", FTConfig(layer=0, norm_constraint=1e-2, **FAST), progress=False) as result:
        weight = mlp_out_weight(model, 0)
        assert weight.dtype == torch.bfloat16 and not weight.requires_grad
        assert result.updates[0][1].dtype == torch.bfloat16
        assert (weight.float() - w0.float()).abs().max() <= 1e-2 + 2 * torch.finfo(torch.bfloat16).eps * w0.abs().max()
        trace = result.traces[0]
        assert all(math.isfinite(v) for v in trace.loss) and trace.loss[-1] < trace.loss[0]
    assert torch.equal(mlp_out_weight(model, 0), w0)


def test_a_failing_extra_term_leaves_the_weights_and_their_grad_flags_as_they_were(tiny_llama):
    snapshot = _params(tiny_llama)

    class Boom:
        name = "boom"

        def hook_names(self, info):
            return []

        def __call__(self, step, acts, info):
            if step == 2:
                raise RuntimeError("boom")
            return torch.zeros(())

    with pytest.raises(RuntimeError, match="boom"):
        apply_edit(tiny_llama, EIFFEL, "ft", FTConfig(layer=0, **FAST), extra_losses=[Boom()], progress=False)
    assert not _unchanged_but(tiny_llama, snapshot, set())
    assert not any(p.requires_grad for p in tiny_llama.parameters())


def test_the_steps_are_the_authors_adam_on_the_weights_with_the_clamp(tiny_llama):
    """Adam on ``W`` with ``W <- clamp(W, W0 - eps, W0 + eps)`` after each step (their loop, run
    here on full forwards of the model with teacher-forced NLL) gives the same weights."""
    config = FTConfig(layer=0, lr=1e-2, steps=6, norm_constraint=1e-3)
    result = apply_edit(tiny_llama, EIFFEL, "ft", config, progress=False)
    result.restore()
    ours = result.updates[0][1]

    batch, _, _ = rewriting_batch(tiny_llama, EIFFEL, ["{}"])
    p, t = int(batch.prompt_lengths[0]), int(batch.target_lengths[0])
    ids = batch.input_ids[0, p:p + t]
    w = mlp_out_weight(tiny_llama, 0)
    w0 = w.detach().clone()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=config.lr)
    try:
        for _ in range(config.steps):
            opt.zero_grad()
            logits = tiny_llama(batch.input_ids[:1], attention_mask=batch.attention_mask[:1])[0, p - 1:p - 1 + t]
            loss = -logits.log_softmax(-1).gather(-1, ids[:, None]).mean()
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.copy_(torch.clamp(w, w0 - config.norm_constraint, w0 + config.norm_constraint))
        theirs = w.detach() - w0
    finally:
        with torch.no_grad():
            w.copy_(w0)
        w.requires_grad_(False)
    assert (ours - theirs).abs().max() < 1e-6, (ours - theirs).abs().max()


# ---------------------------------------------------------------- SADR

class _Probe:
    """Wraps SADR: keeps its value per step, its gradient w.r.t. the tuned weight, and the step-0
    patterns it was handed."""

    def __init__(self, sadr: SADRLoss, param):
        self.sadr, self.param, self.name = sadr, param, "probe"
        self.values, self.grad_norms, self.first_patterns, self.info = [], [], None, None

    def hook_names(self, info):
        return self.sadr.hook_names(info)

    def __call__(self, step, acts, info):
        value = self.sadr(step, acts, info)
        self.values.append(value.item())
        if step == 0:
            self.info = info
            self.first_patterns = {n: acts[n].detach().clone() for n in self.hook_names(info)}
        if value.requires_grad:
            (grad,) = torch.autograd.grad(value, self.param, retain_graph=True)
            self.grad_norms.append(grad.norm().item())
        else:
            self.grad_norms.append(0.0)
        return value


def test_sadr_is_zero_at_step_0_on_the_unedited_patterns_and_differentiable_after(tiny_llama):
    param = mlp_out_weight(tiny_llama, 0)
    sadr = SADRLoss(SADRConfig(weight=100.0, selection="all"))
    probe = _Probe(sadr, param)
    result = apply_edit(tiny_llama, EIFFEL, "ft", FTConfig(layer=0, **FAST), extra_losses=[probe], progress=False)
    result.restore()
    assert probe.values[0] == 0.0  # the reference patterns are those of step 0, before any change
    assert all(v > 0 for v in probe.values[1:]) and all(g > 0 for g in probe.grad_norms[1:])
    assert result.extra_trace["probe"][0] == probe.values
    # the reference patterns are the unedited model's (a plain full forward)
    batch = probe.info.batch
    _, cache = tiny_llama.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                         names_filter=lambda n: n.endswith("hook_pattern"))
    assert set(probe.first_patterns) == {act_name("pattern", 0), act_name("pattern", 1)}
    for name, pattern in probe.first_patterns.items():
        assert torch.allclose(pattern, cache[name].float(), atol=1e-6)
    # the patterns move with the weights: layer 1's attention reads layer 0's tuned MLP output
    assert sadr.record["divergence_after"][:, 1].sum() > 0
    assert sadr.record["divergence_after"][:, 0].abs().max() < 1e-6  # layer 0's attention is before its MLP


def test_sadr_through_edit_records_per_request_and_uses_the_chosen_weight(tiny_llama):
    resolved = SADRConfig().resolved(tiny_llama, "ft")
    assert (resolved.weight, resolved.steps) == (0.01, None)  # ROME's weight, FT's own steps
    config = FTConfig(layer=0, **FAST)
    with edit(tiny_llama, [EIFFEL, JORDAN], "ft", config, sadr=SADRConfig(weight=10.0, selection="all"),
              progress=False) as result:
        assert result.config == config  # steps unchanged: FT keeps its own
        for trace, record in zip(result.traces, result.sadr_records):
            assert trace.extra["sadr"][0] == 0.0 and max(trace.extra["sadr"]) > 0
            assert len(record["mask"]) == trace.steps_run and record["layers"] == (0, 1)


def test_sadr_plus_runs_on_ft_with_its_output_term_and_verify(tiny_llama):
    from attention_drift.runs.variants import paper_variants

    config, sadr = paper_variants()["ft-sadr-plus"].resolve(tiny_llama)
    assert sadr.steps is None and sadr.output == "contrast" and sadr.verify and sadr.weight == 0.0
    assert config == FTConfig.for_model(tiny_llama)
    with edit(tiny_llama, EIFFEL, "ft", dataclasses.replace(config, **FAST), sadr=sadr, progress=False) as result:
        output = result.traces[0].extra["sadr"] if result.fallback is None else None
        record = result.sadr_records[0]
    if output is not None:  # the SADR edit held: its output term ran on the distract rows
        assert output[0] == 0.0 and record["distract_rows"] == 3 and len(record["output_loss"]) == len(output)


def test_the_clamp_that_sadr_scales_and_verify_doubles_is_the_norm_constraint(tiny_llama):
    from attention_drift.editing.api import _fallbacks
    from attention_drift.editing.registry import clamp_field, resolve_edit

    config = FTConfig(layer=0, norm_constraint=1e-3)
    assert clamp_field(config) == "norm_constraint" and clamp_field(ROMEConfig(layer=0)) == "clamp_norm_factor"
    _, scaled, _ = resolve_edit(tiny_llama, "ft", config, SADRConfig(weight=0.01, clamp_scale=3.0))
    assert scaled.norm_constraint == pytest.approx(3e-3)
    assert [(name, c.norm_constraint) for name, c, _ in _fallbacks(config, ())] == \
        [("plain", 1e-3), ("plain-clamp2", 2e-3)]
    free = FTConfig(layer=0, norm_constraint=None)
    assert [name for name, _, _ in _fallbacks(free, ())] == ["plain"]
    with pytest.raises(ConfigError, match="has none"):
        resolve_edit(tiny_llama, "ft", free, SADRConfig(weight=0.01, clamp_scale=2.0))


# ---------------------------------------------------------------- frozen reference

def _summary(delta: torch.Tensor) -> list[float]:
    d = delta.double()
    return [d.norm().item(), d.sum().item(), d.abs().sum().item(), d[3, 5].item(), d[-1, -2].item()]


# (delta norm, sum, abs sum, [3, 5], [-1, -2]), loss per step: written by this module's code when FT was added
# (1 thread); most weights end at the clamp (Llama 93%, GPT-2 39%), the sums and norms carry the rest
REFERENCE = {
    "llama": ([0.44197518276919384, -0.397061959723942, 39.54492014297284, -0.004999999888241291, 0.004999999888241291],
              [5.860298156738281, 5.818513870239258, 5.777097702026367, 5.736103534698486, 5.695570945739746,
               5.655700206756592, 5.654913902282715, 5.654477119445801]),
    "gpt2": ([0.49873558056796885, 0.08334678501341841, 58.189324455375754, 0.0018885827157646418, 0.004999999888241291],
             [5.781744480133057, 5.354764461517334, 5.132575988769531, 5.025774955749512, 4.973923683166504,
              4.945437431335449, 4.9405741691589355, 4.941067695617676]),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_reference_of_a_seeded_tiny_edit(arch):
    """A change of what FT computes (loss, steps, clamp, rows, layer) moves these far beyond 1e-4;
    float32 arithmetic in another order moves them by ~1e-6."""
    model = tiny_model(arch, n_layers=3)
    config = FTConfig(layer=1, lr=1e-3, steps=8, norm_constraint=5e-3)
    result = apply_edit(model, EIFFEL, "ft", config, progress=False)
    summary, loss = _summary(result.updates[0][1]), result.traces[0].loss
    result.restore()
    want_summary, want_loss = REFERENCE[arch]
    scale = max(abs(v) for v in summary)
    assert summary == pytest.approx(want_summary, abs=1e-4 * scale), summary
    assert loss == pytest.approx(want_loss, abs=1e-4 * max(loss)), loss


# ---------------------------------------------------------------- presets, registry, CLI

def test_config_errors_come_before_any_weight_changes(tiny_llama):
    snapshot = _params(tiny_llama)
    with pytest.raises(ConfigError, match="norm_constraint must be > 0"):
        FTConfig(layer=0, norm_constraint=0.0)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        FTConfig(layer=0, steps=0)
    with pytest.raises(ConfigError, match="FT edit layer 4 is out of range: the model has 2 layers"):
        apply_edit(tiny_llama, EIFFEL, "ft", FTConfig(layer=4))
    with pytest.raises(ConfigError, match="needs a FTConfig"):
        apply_edit(tiny_llama, EIFFEL, "ft", ROMEConfig(layer=0))
    assert not _unchanged_but(tiny_llama, snapshot, set())


def _fake(family, depth, d_model):
    return types.SimpleNamespace(cfg=types.SimpleNamespace(d_model=d_model), _family=family, _depth=depth)


def test_presets_follow_the_authors_files_and_rome_layer_on_smollm2(monkeypatch):
    import attention_drift.editing.config as config

    monkeypatch.setattr(config, "model_family", lambda model: model._family)
    monkeypatch.setattr(config, "n_layers", lambda model: model._depth)
    smol = FTConfig.for_model(_fake("llama", 30, 576))
    assert smol == FTConfig(layer=5, lr=5e-4, steps=25, norm_constraint=2e-3, early_stop_loss=1e-2)
    assert smol.layer == ROMEConfig.for_model(_fake("llama", 30, 576)).layer
    gpt2_xl = FTConfig.for_model(_fake("gpt2", 48, 1600))
    assert (gpt2_xl.layer, gpt2_xl.lr, gpt2_xl.steps, gpt2_xl.norm_constraint) == (0, 5e-4, 25, 5e-4)
    assert FTConfig.for_model(_fake("gptj", 28, 4096)).norm_constraint == 5e-5
    with pytest.raises(ConfigError, match="no FT preset for model family 'llama' with 32 layers"):
        FTConfig.for_model(_fake("llama", 32, 4096))


def test_registry_variants_and_cli_know_ft(tiny_llama, tmp_path):
    import argparse
    import json

    from attention_drift import cli
    from attention_drift.editing import CONFIG_TYPES, EDITORS, METHODS
    from attention_drift.runs.variants import Variant, VariantError

    assert "ft" in METHODS and CONFIG_TYPES["ft"] is FTConfig and EDITORS["ft"].state_type is None
    parser = argparse.ArgumentParser()
    cli.add_variant_arguments(parser)
    variant = cli.variant_from_args(parser.parse_args(["--method", "ft"]))
    assert variant == Variant("ft", "ft")
    config, sadr = variant.resolve(tiny_llama)
    assert config == FTConfig.for_model(tiny_llama) == FTConfig(layer=0, steps=5, norm_constraint=2e-3) and sadr is None
    with pytest.raises(VariantError, match="uses no covariance statistics"):
        Variant("ft", "ft", stats_samples=10).resolve(tiny_llama)
    out = tmp_path / "ft.jsonl"
    folder = tiny_llama.model_name
    assert cli.main(["evaluate", "--model", folder, "--out", str(out), "--no-progress", "--method", "ft",
                     "--limit", "1"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["meta"]["edit"]["method"] == "ft" and lines[1]["method"] == "ft" and lines[1]["edit_seconds"] > 0
