"""Speed-related behaviour of the value optimisation: no logits in the reference pass, a
progress bar over the steps, float32 maths on a bfloat16 model."""

import pytest
import torch

from attention_drift import tokens
from attention_drift.data import Rewrite
from attention_drift.editing import Objective, ROMEConfig, StatsConfig, apply_edit
from attention_drift.editing import optimize
from attention_drift.editing.optimize import LayerRunner, optimize_values, rewriting_batch
from attention_drift.hooks import act_name
from attention_drift.models import tiny_model

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))


def _rome(**overrides):
    base = dict(layer=1, steps=8, context_templates=((4, 2),), mom2_adjustment=False)
    return ROMEConfig(**{**base, **overrides})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_pass_computes_no_logits(arch):
    model = tiny_model(arch, n_layers=3)
    batch, _, subj = rewriting_batch(model, EIFFEL, ["{}", "Paris is big. {}"])
    calls = []
    handle = model.unembed.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        runner = LayerRunner(model, batch, 1, changes_from=subj)
    finally:
        handle.remove()
    assert calls == []
    with torch.no_grad():
        full = model(batch.input_ids, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    assert torch.allclose(runner.logits[real], full[real], atol=1e-5, rtol=0)  # computed when asked


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_delta_is_the_same_as_with_full_reference_logits(arch, monkeypatch):
    """The reference pass used to end with full-vocabulary logits; stopping before them changes
    nothing in the edit."""
    model = tiny_model(arch, n_layers=3)
    fast = apply_edit(model, EIFFEL, "rome", _rome(), progress=False)
    fast.restore()
    monkeypatch.setattr(optimize, "_stop_before_final_norm", lambda module, args, kwargs: None)
    full = apply_edit(model, EIFFEL, "rome", _rome(), progress=False)
    full.restore()
    name = "blocks.1.mlp.out.weight"
    assert fast.deltas[name].abs().sum() > 0
    torch.testing.assert_close(fast.deltas[name], full.deltas[name], atol=1e-6, rtol=1e-6)
    assert fast.traces[0].loss == pytest.approx(full.traces[0].loss, rel=1e-6)


def test_progress_bar_over_steps_only_when_asked(tiny_llama, capsys):
    site = act_name("mlp_raw", 1)
    objective = Objective(lr=0.5, steps=3, weight_decay=0.0, clamp_norm_factor=4.0, kl_factor=0.0625,
                          early_stop_loss=0.0)
    optimize_values(tiny_llama, EIFFEL, ["{}"], sites=[site], layer=1, objective=objective)
    assert "optimising value" not in capsys.readouterr().err
    solution = optimize_values(tiny_llama, EIFFEL, ["{}"], sites=[site], layer=1, objective=objective,
                               progress=True)
    err = capsys.readouterr().err
    assert "optimising value" in err and "/3 " in err and solution.trace.steps_run == 3


def test_apply_edit_passes_its_progress_flag_to_every_editor(tiny_llama, capsys):
    from attention_drift.editing import EDITORS, apply_edit

    for method in EDITORS:
        apply_edit(tiny_llama, EIFFEL, method, progress=False).restore()
        assert "optimising value" not in capsys.readouterr().err
        apply_edit(tiny_llama, EIFFEL, method, progress=True).restore()
        assert "optimising value" in capsys.readouterr().err, method


def test_rome_edits_a_bfloat16_model_with_float32_maths():
    """On a bfloat16 model the delta, the losses and the covariance are float32 and the edit
    does what it does on the same weights in float32: the same delta (up to bfloat16 rounding
    of the activations), and the edited layer maps the subject's key to ``v*``. (A tiny random
    model's logits barely move, so efficacy itself is checked on SmolLM2, by hand.)"""
    stats = StatsConfig(n_samples=32, seq_len=16)
    site = act_name("mlp_raw", 1)
    deltas = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", n_layers=3, dtype=dtype)
        assert model.blocks[0].mlp.out.weight.dtype == dtype
        result = apply_edit(model, EIFFEL, "rome", _rome(steps=12, mom2_adjustment=True, stats=stats, weight_decay=0.0),
                            progress=False)
        trace = result.traces[0]
        assert model.blocks[1].mlp.out.weight.dtype == dtype
        assert trace.delta[site].dtype == torch.float32 and trace.init[site].dtype == torch.float32
        assert all(torch.isfinite(torch.tensor(trace.loss))) and trace.loss[-1] < trace.loss[0]
        assert trace.target_prob[-1] > trace.target_prob[0]
        batch = tokens.batch_prompts(model, [EIFFEL.prompt])
        _, last = tokens.subject_span(model, EIFFEL.prompt, EIFFEL.subject)
        _, cache = model.run_with_cache(batch.input_ids, names_filter=lambda n: n == site)
        v_star = trace.init[site] + trace.delta[site]
        error = (cache[site][0, last].float() - v_star).norm() / v_star.norm()
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), (dtype, error)
        deltas[dtype] = trace.delta[site]
    assert torch.nn.functional.cosine_similarity(deltas[torch.float32], deltas[torch.bfloat16], dim=0) > 0.99


class _ReadOutput:
    """An extra term that asks for the next-token log-probabilities of its extra prompt and
    keeps those of step 0 (delta zero)."""

    name = "read_output"

    def __init__(self, prompt: str):
        self.prompt, self.seen = prompt, []

    def extra_prompts(self, request):
        return [self.prompt]

    def output_rows(self, info):
        return info.extra_rows

    def hook_names(self, info):
        return []

    def __call__(self, step, acts, info):
        self.seen.append(acts[optimize.OUTPUT].detach().clone())
        return torch.zeros(())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # cached-suffix layout and full rows
def test_output_rows_are_the_full_forwards_next_token_log_probs(arch):
    model = tiny_model(arch, n_layers=3)
    prompt = "The Eiffel Tower is located in Rome. The Louvre is located in"
    term = _ReadOutput(prompt)
    optimize_values(model, EIFFEL, ["{}", "Paris is big. {}"], sites=[act_name("mlp_raw", 1)], layer=1,
                    objective=Objective(lr=0.5, steps=3, weight_decay=0.0, clamp_norm_factor=4.0, kl_factor=0.0),
                    extra_losses=[term])
    batch = tokens.batch_prompts(model, [prompt])
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    expected = logits[0, batch.last_prompt_index[0]].float().log_softmax(-1)
    assert term.seen[0].shape == (1, model.cfg.d_vocab)
    torch.testing.assert_close(term.seen[0][0], expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(term.seen[-1], term.seen[0])  # later steps see the delta
