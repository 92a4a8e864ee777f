import dataclasses

from dataclasses import replace

import pytest
import torch

from attention_drift.core.data import Rewrite
from attention_drift.editing import EditError, MEMITConfig, PMETConfig, ROMEConfig, StatsConfig, apply_edit, edit
from attention_drift.editing.api import _check_sadr
from attention_drift.core.models import tiny_model
from attention_drift.editing.registry import resolve_edit
from attention_drift.editing.sadr import PRESETS, SADRConfig, SADRError, SADRLoss, distract_prompts, divergence, hinge_mask, sadr_loss


def _rows(values):
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum(-1, keepdim=True)


def test_hinge_selects_exactly_heads_above_the_pre_edit_layer_maximum():
    # one prompt, one layer, three heads, three keys; the subject's last token is key 1
    before = _rows([[[[1, 2, 1], [1, 1, 2], [2, 1, 1]]]])  # max attention to key 1 before: 0.5
    now = _rows([[[[1, 3, 1], [1, 2, 1], [1, 1, 2]]]])  # head 0: 0.6 > 0.5; head 1: 0.5 (not >); head 2: 0.25
    mask = hinge_mask(before, now, torch.tensor([1]))
    assert mask.tolist() == [[[True, False, False]]]


def test_hinge_threshold_is_per_layer_and_per_prompt():
    before = _rows([[[[1, 1]], [[1, 3]]], [[[3, 1]], [[1, 1]]]])  # [prompt=2, layer=2, head=1, key=2]
    now = _rows([[[[1, 2]], [[1, 2]]], [[[1, 2]], [[1, 2]]]])
    mask = hinge_mask(before, now, torch.tensor([1, 0]))
    # prompt 0 / key 1: layer 0 before .5 -> now .67 selected; layer 1 before .75 -> not
    # prompt 1 / key 0: layer 0 before .75 -> now .33 not; layer 1 before .5 -> now .33 not
    assert mask[..., 0].tolist() == [[True, False], [False, False]]


def test_loss_is_zero_before_the_edit_and_positive_after():
    before = _rows(torch.rand(2, 3, 4, 5).tolist())
    cfg = SADRConfig(weight=1.0, selection="all")
    loss, _ = sadr_loss(before, before.clone(), torch.tensor([1, 2]), cfg)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    now = _rows((torch.rand(2, 3, 4, 5) + 0.1).tolist())
    loss, mask = sadr_loss(before, now, torch.tensor([1, 2]), cfg)
    assert loss.item() > 0 and mask.all()


def test_loss_is_weighted_sum_over_selected_heads_averaged_over_prompts():
    """The hinge selects a known, non-empty set of heads (built so: those heads' attention to the
    subject rises above the layer's pre-edit maximum, every other head's falls), and the loss is
    weight * (sum of their KL divergences) / number of prompts, computed here by hand. Prompt 1 has
    no selected head and still counts in the average; other weightings give other numbers."""
    n_prompts, n_layers, n_heads, n_keys = 3, 2, 4, 6
    before = (0.3 * torch.randn(n_prompts, n_layers, n_heads, n_keys)).softmax(-1)
    subject = torch.tensor([0, 3, 5])
    selected = {(0, 0, 1), (0, 1, 3), (2, 0, 0), (2, 0, 2)}
    onehot = torch.nn.functional.one_hot(subject, n_keys).float()[:, None, None, :]
    raised = 0.5 * before + 0.5 * onehot  # attention to the subject >= 0.5
    lowered = before.clone()
    lowered[torch.arange(n_prompts), ..., subject] *= 0.5
    lowered = lowered / lowered.sum(-1, keepdim=True)  # attention to the subject falls
    now = lowered.clone()
    for p, l, h in selected:
        now[p, l, h] = raised[p, l, h]
    before_subject = before[torch.arange(n_prompts), ..., subject]
    assert before_subject.max() < 0.5  # so the raised heads exceed every layer's pre-edit maximum

    loss, mask = sadr_loss(before, now, subject, SADRConfig(weight=0.5))

    assert mask.any() and not mask.all()
    assert {tuple(i) for i in mask.nonzero().tolist()} == selected

    def kl(p, l, h):
        b, n = before[p, l, h].double(), now[p, l, h].double()
        return float((b * (b.log() - n.log())).sum())

    every = [(p, l, h) for p in range(n_prompts) for l in range(n_layers) for h in range(n_heads)]
    expected = 0.5 * sum(kl(*i) for i in selected) / n_prompts
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    wrong = {
        "every head": 0.5 * sum(kl(*i) for i in every) / n_prompts,
        "mean over selected heads": 0.5 * sum(kl(*i) for i in selected) / len(selected),
        "prompts with a selected head": 0.5 * sum(kl(*i) for i in selected) / 2,
        "no prompt average": 0.5 * sum(kl(*i) for i in selected),
        "unweighted": sum(kl(*i) for i in selected) / n_prompts,
    }
    for name, value in wrong.items():
        assert abs(value - expected) > 0.1 * expected, name  # the test tells these weightings apart


def test_loss_has_gradient_reaching_the_current_rows():
    before = _rows(torch.rand(2, 2, 3, 4).tolist())
    logits = torch.randn(2, 2, 3, 4, requires_grad=True)
    loss, _ = sadr_loss(before, logits.softmax(-1), torch.tensor([1, 2]), SADRConfig(weight=0.01, selection="all"))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["kl", "js", "l2"])
def test_divergences_are_zero_on_equal_rows_and_nonnegative(kind):
    p, q = _rows(torch.rand(5, 7).tolist()), _rows(torch.rand(5, 7).tolist())
    assert divergence(p, p, kind).abs().max() < 1e-6
    assert (divergence(p, q, kind) >= 0).all()


def test_padded_keys_contribute_nothing():
    before = torch.tensor([[[[0.5, 0.5, 0.0]]]])
    now = torch.tensor([[[[0.25, 0.75, 0.0]]]])
    padded = divergence(before, now)
    unpadded = divergence(before[..., :2], now[..., :2])
    torch.testing.assert_close(padded, unpadded)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"selection": "some"}, "selection"), ({"divergence": "cos"}, "divergence"), ({"weight": -1.0}, "weight"), ({"steps": 0}, "steps")],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SADRConfig(**kwargs)


# ------------------------------------------------------------- inside the editors (tiny model)

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
STEPS = 6  # the editors' steps in these tests; SADR configs set them too (unset: the published 80 / 20 / 40)


@pytest.fixture
def stats(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    return StatsConfig(corpus="model", n_samples=32, seq_len=24)


def _config(method, stats):
    cls = {"rome": ROMEConfig, "memit": MEMITConfig, "pmet": PMETConfig}[method]
    base = cls(layer=1, stats=stats) if method == "rome" else cls(layers=(1,), stats=stats)
    return dataclasses.replace(base, steps=STEPS, context_templates=((4, 2),), weight_decay=0.0)


@pytest.mark.parametrize("method", ["rome", "memit", "pmet"])
def test_sadr_runs_inside_each_editor_and_records_masks_and_loss(method, stats):
    model = tiny_model("llama", n_layers=3)
    sadr = SADRConfig(weight=1.0, selection="all", steps=5)
    with edit(model, EIFFEL, method, _config(method, stats), sadr=sadr) as result:
        record = result.sadr_records[0]
        trace = result.traces[0]
    assert result.config.steps == 5 and result.sadr == sadr
    assert record["layers"] == (1, 2)  # every layer from the edit layer up
    assert trace.extra["sadr"][0] == 0.0 and all(v >= 0 for v in trace.extra["sadr"])
    assert max(trace.extra["sadr"][1:]) > 0
    assert len(record["mask"]) == len(record["loss"]) == trace.steps_run
    n_rows = 3  # the bare prompt and two prefixed ones
    assert record["mask"][0].shape == (n_rows, 2, model.cfg.n_heads) and bool(record["mask"][0].all())
    assert record["subject_before"].shape == (n_rows, 2, model.cfg.n_heads)


def test_sadr_lowers_attention_drift_against_the_plain_edit(stats):
    model = tiny_model("llama", n_layers=3)
    cfg = _config("rome", stats)
    with edit(model, EIFFEL, "rome", cfg, sadr=SADRConfig(weight=0.0, selection="all", steps=STEPS)) as plain:
        plain_drift = plain.sadr_records[0]["divergence_after"].sum()
        plain_delta = plain.traces[0].delta["blocks.1.mlp.hook_out"]
    with edit(model, EIFFEL, "rome", cfg, sadr=SADRConfig(weight=100.0, selection="all", steps=STEPS)) as restricted:
        trace = restricted.traces[0]
        drift = restricted.sadr_records[0]["divergence_after"].sum()
    # The gradient of the attention term reached the optimised vector and changed it ...
    assert not torch.allclose(trace.delta["blocks.1.mlp.hook_out"], plain_delta)
    # ... so that the attention rows moved less than without the term.
    assert plain_drift > 0 and drift < plain_drift


def test_sadr_distract_rows_join_the_batch_without_touching_the_editors_own_loss(stats):
    model = tiny_model("llama", n_layers=3)
    cfg = _config("rome", stats)
    prompts = distract_prompts(EIFFEL)
    assert prompts[0] == "The Eiffel Tower is located in Rome. The Barack Obama is located in"
    with edit(model, EIFFEL, "rome", cfg, sadr=SADRConfig(weight=0.0, distract=True, steps=STEPS)) as with_rows:
        nll_rows = with_rows.traces[0].nll
        record = with_rows.sadr_records[0]
    with edit(model, EIFFEL, "rome", cfg) as plain:
        nll_plain = plain.traces[0].nll
    assert record["distract_rows"] == len(prompts) and record["mask"][0].shape[0] == 3 + len(prompts)
    assert nll_rows == pytest.approx(nll_plain, rel=1e-5)  # weight 0: the same optimisation


def test_mention_rows_name_the_subject_without_the_new_target():
    """``distract_forms``: the mention rows are built from the request alone, name the edited
    subject (where the delta goes in) and not its new target, and are not the suite's sentence."""
    from attention_drift.editing.sadr import MENTIONS
    from attention_drift.measure.groups import MENTION

    both = distract_prompts(EIFFEL, forms=("edit", "mention"))
    edit_rows, mention_rows = both[:3], both[3:]
    assert edit_rows == distract_prompts(EIFFEL)
    assert mention_rows[0] == "Here is some news about Eiffel Tower. The Barack Obama is located in"
    for row, mention in zip(mention_rows, MENTIONS):
        assert row.startswith(mention.format(subject="Eiffel Tower")) and "Rome" not in row
    assert MENTION not in MENTIONS
    with pytest.raises(SADRError, match="distract_forms"):
        SADRConfig(distract=True, distract_forms=("restated",))


def test_restate_rows_put_a_neutral_sentence_before_the_edit_sentence():
    """``"restate"`` rows: a fixed neutral sentence, the edit sentence, then the prompt about another
    subject; built from the request alone, never from a record's paraphrases."""
    rows = distract_prompts(EIFFEL, forms=("edit", "restate"))
    assert rows[3] == ("Here is something I learned today. The Eiffel Tower is located in Rome. "
                       "The Barack Obama is located in")
    assert [r.split(". ", 1)[1] for r in rows[3:]] == rows[:3]


def test_an_added_sadr_field_at_its_default_keeps_earlier_edit_keys(tiny_llama):
    """Fields added after edit keys were in use (``LATER_FIELDS``) leave the key as it was at their
    default (absent from the description); another value changes it."""
    from attention_drift.editing import edit_key
    from attention_drift.editing.identity import describe_edit

    sadr = SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="contrast", steps=STEPS)
    assert "distract_forms" not in describe_edit(tiny_llama, "rome", None, sadr)["sadr"]
    key = edit_key(tiny_llama, "rome", None, sadr)
    assert key == edit_key(tiny_llama, "rome", None, replace(sadr, distract_forms=("edit",)))
    assert key != edit_key(tiny_llama, "rome", None, replace(sadr, distract_forms=("edit", "mention")))
    assert "output_margin" not in describe_edit(tiny_llama, "rome", None, sadr)["sadr"]
    assert key != edit_key(tiny_llama, "rome", None, replace(sadr, output_margin=2.0))


def test_sadr_distract_only_restricts_just_the_distract_rows(stats):
    model = tiny_model("llama", n_layers=3)
    cfg = _config("rome", stats)
    only = SADRConfig(weight=1.0, distract_only=True, steps=STEPS)
    assert only.distract  # implied
    with edit(model, EIFFEL, "rome", cfg, sadr=only) as result:
        record = result.sadr_records[0]
        trace = result.traces[0]
    n = len(distract_prompts(EIFFEL))
    assert all(mask.shape[0] == n for mask in record["mask"])
    assert record["loss"][0] == 0.0 and min(record["loss"]) >= 0.0
    assert trace.extra["sadr"][1:] and max(trace.extra["sadr"][1:]) > 0.0


def test_sadr_must_be_a_config_and_layers_in_range(stats):
    model = tiny_model("llama", n_layers=3)
    original = [b.mlp.out.weight.detach().clone() for b in model.blocks]
    with pytest.raises(EditError, match="SADRConfig"):
        _check_sadr(0.01)  # what edit() and apply_edit() run first (beartype answers first under pytest)
    with pytest.raises(EditError, match="out of range"):
        apply_edit(model, EIFFEL, "rome", _config("rome", stats), sadr=SADRConfig(layers=(7,)))
    assert all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, original))


@pytest.mark.parametrize("method, weight, steps", [("rome", 0.01, 80), ("memit", 0.005, 20), ("pmet", 0.08, 40)])
def test_unset_weight_and_steps_are_the_published_protocol_of_the_method(method, weight, steps, stats):
    model = tiny_model("llama", n_layers=3)
    _, config, sadr = resolve_edit(model, method, _config(method, stats), SADRConfig())
    assert (sadr.weight, sadr.steps, config.steps) == (weight, steps, steps)
    assert sadr == SADRConfig.for_model(model, method)  # what the command line builds
    _, config, sadr = resolve_edit(model, method, _config(method, stats), SADRConfig(weight=0.3, steps=7))
    assert (sadr.weight, sadr.steps, config.steps) == (0.3, 7, 7)


def test_a_family_preset_is_the_default_of_the_api_too(stats, monkeypatch):
    model = tiny_model("llama", n_layers=3)
    monkeypatch.setitem(PRESETS, ("llama", "rome"), (0.5, 30))
    _, config, sadr = resolve_edit(model, "rome", _config("rome", stats), SADRConfig(selection="all"))
    assert (sadr.weight, sadr.steps, config.steps) == (0.5, 30, 30)
    assert sadr == SADRConfig.for_model(model, "rome", selection="all")
    assert SADRConfig().resolved("gpt2", "rome") == SADRConfig(weight=0.01, steps=80)  # other families: published


def test_rome_with_the_default_sadr_config_runs_the_published_80_steps(stats):
    model = tiny_model("llama", n_layers=3)
    result = apply_edit(model, EIFFEL, "rome", _config("rome", stats), sadr=SADRConfig(), progress=False)
    result.restore()
    assert result.traces[0].steps_run == 80 and result.config.steps == 80
    assert len(result.sadr_records[0]["loss"]) == 80
    assert result.sadr == SADRConfig(weight=0.01, steps=80)


def test_an_unresolved_weight_is_a_clear_error():
    before = _rows(torch.rand(1, 1, 2, 3).tolist())
    with pytest.raises(SADRError, match="resolve"):
        sadr_loss(before, before, torch.tensor([0]), SADRConfig())
    with pytest.raises(SADRError, match="no published SADR weight"):
        SADRConfig().resolved("llama", "fine-tune")
    assert SADRConfig(weight=0.2).resolved("llama", "fine-tune") == SADRConfig(weight=0.2)  # steps: the editor's


# ------------------------------------------------------------- real model (slow)

@pytest.mark.slow
def test_sadr_lowers_subject_attention_in_a_distract_prompt_on_smollm2(smollm2):
    """Eiffel Tower -> Rome: plain ROME makes the prediction position of a distract prompt
    attend more to "Tower"; with SADR that drift is smaller."""
    from attention_drift.core.data import distract_prompt
    from attention_drift.measure.drift import measure_drift

    rewrite = Rewrite("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    prompt = distract_prompt(rewrite, "The Louvre is located in the city of")
    cfg = dataclasses.replace(ROMEConfig.for_model(smollm2), context_templates=((5, 5),),
                              stats=StatsConfig(n_samples=64, seq_len=64))

    def drift(sadr):
        measured = measure_drift(smollm2, rewrite, [prompt], lambda: edit(smollm2, rewrite, "rome", cfg, sadr=sadr))
        before, after = measured.mass("subject_last")
        return (after - before)[0]

    plain = drift(None)
    restricted = drift(SADRConfig(weight=1.0, steps=20))
    assert plain.max() > 0.05  # plain ROME drifts onto the subject
    assert restricted.clamp(min=0).sum() < plain.clamp(min=0).sum()
    assert restricted.max() < plain.max()


# ------------------------------------------------------------- the output term (SADR+)

@pytest.mark.parametrize("kwargs, match", [
    ({"output_weight": 1.0}, "distract=True"),
    ({"output_weight": -1.0, "distract": True}, "output_weight"),
    ({"output_weight": 1.0, "distract": True, "output": "nll"}, "output"),
    ({"distract": True, "distract_subjects": ()}, "subject"),
    ({"guard_weight": -1.0}, "guard_weight"),
    ({"clamp_scale": 0.0}, "clamp_scale"),
])
def test_bad_output_term_config_is_a_clear_error(kwargs, match):
    with pytest.raises(SADRError, match=match):
        SADRConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"output_margin": -1.0, "output_weight": 1.0, "distract": True},
    {"output_margin": 2.0},
    {"output_margin": 2.0, "output_weight": 1.0, "distract": True, "output": "kl"},
])
def test_an_output_margin_needs_a_rise_to_measure(kwargs):
    with pytest.raises(SADRError, match="output_margin"):
        SADRConfig(**kwargs)


@pytest.mark.parametrize("output", ["contrast", "target"])
def test_output_margin_lets_each_row_rise_that_far_free(output):
    """``relu(rise - output_margin)`` per distract row, averaged: rows that rose less than the margin
    add nothing (and no gradient), the others their excess; margin 0 is the plain term."""
    from types import SimpleNamespace

    from attention_drift.editing.sadr import OUTPUT

    info = SimpleNamespace(n_rewriting=0, target_ids=(1, 2))
    before = torch.zeros(3, 4)
    rise = torch.tensor([0.5, 2.0, 3.5])  # of log p(new) (and of log-odds new vs true: p(true) stays)
    terms = {}
    for margin in (0.0, 1.0):
        loss = SADRLoss(SADRConfig(weight=0.0, distract=True, output_weight=1.0, output=output, output_margin=margin))
        loss._output_term(True, {OUTPUT: before}, info)
        now = before.clone()
        now[:, 1] += rise
        now.requires_grad_(True)
        terms[margin] = loss._output_term(False, {OUTPUT: now}, info)
        terms[margin].backward()
        grads = now.grad[:, 1]
        if margin:
            assert grads.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])
    assert terms[0.0].item() == pytest.approx(rise.mean().item())
    assert terms[1.0].item() == pytest.approx((0.0 + 1.0 + 2.5) / 3)


@pytest.mark.parametrize("output", ["target", "contrast", "kl", "both"])
def test_output_term_is_zero_before_the_edit_and_has_gradient_after(output, stats):
    model = tiny_model("llama", n_layers=3)
    sadr = SADRConfig(weight=0.0, distract=True, output_weight=50.0, output=output, steps=STEPS)
    with edit(model, EIFFEL, "rome", _config("rome", stats), sadr=sadr) as result:
        record = result.sadr_records[0]
        trace = result.traces[0]
    assert record["output_loss"][0] == 0.0 and min(record["output_loss"]) >= 0.0
    assert record["mask"] == [] and record["layers"] == ()  # weight 0: no attention term, no patterns read
    assert max(record["output_loss"][1:]) > 0.0  # the delta moved the distract rows' predictions...
    assert trace.extra["sadr"] == pytest.approx([50.0 * v for v in record["output_loss"]])
    with edit(model, EIFFEL, "rome", _config("rome", stats)) as plain:
        plain_delta = plain.traces[0].delta["blocks.1.mlp.hook_out"]
    # ... and its gradient reached the optimised vector
    assert not torch.allclose(trace.delta["blocks.1.mlp.hook_out"], plain_delta)


def test_guard_pushes_the_new_target_past_the_old_one_on_the_rewriting_prompt(stats):
    """The efficacy guard is positive while the old target still wins on the rewriting rows, has
    a gradient, and an edit with it (and a contrast term pulling the other way) ends with a
    larger log-odds(new vs old) on the request's prompt than the same edit without it."""
    from attention_drift.core.scores import continuation_log_probs

    model = tiny_model("llama", n_layers=3)
    cfg = dataclasses.replace(_config("rome", stats), steps=8)

    def logodds():
        new, true = (continuation_log_probs(model, [EIFFEL.prompt], [t])[0].item()
                     for t in (EIFFEL.target_new, EIFFEL.target_true))
        return new - true

    base = SADRConfig(weight=0.0, distract=True, output_weight=50.0, output="contrast", steps=8)
    with edit(model, EIFFEL, "rome", cfg, sadr=base):
        unguarded = logodds()
    guarded_cfg = dataclasses.replace(base, guard_weight=50.0, guard_margin=5.0)
    with edit(model, EIFFEL, "rome", cfg, sadr=guarded_cfg) as result:
        guarded = logodds()
        record = result.sadr_records[0]
    assert record["guard_loss"][0] > 0.0
    assert result.traces[0].extra["sadr"][0] == pytest.approx(50.0 * record["guard_loss"][0] + 50.0 * 0.0)
    assert guarded > unguarded


def test_verify_keeps_the_sadr_edit_where_it_holds_and_falls_back_where_it_does_not(stats, monkeypatch, tmp_path):
    """With ``verify``, an edit whose request does not hold is redone without the SADR term (the
    plain edit, bitwise), then with the clamp doubled; without ``verify`` nothing is checked."""
    from attention_drift.editing import api

    model = tiny_model("llama", n_layers=3)
    cfg = _config("rome", stats)
    sadr = SADRConfig(weight=0.0, distract=True, output_weight=50.0, output="contrast", steps=STEPS)
    verdicts: list[bool] = []

    def holds(model, requests):
        return verdicts.pop(0)

    monkeypatch.setattr(api, "_requests_hold", holds)
    with edit(model, EIFFEL, "rome", cfg) as plain:
        plain_delta = next(iter(plain.deltas.values())).clone()
    with edit(model, EIFFEL, "rome", cfg, sadr=sadr) as unchecked:
        sadr_delta = next(iter(unchecked.deltas.values())).clone()
    assert unchecked.fallback is None and not torch.equal(sadr_delta, plain_delta)

    verified = dataclasses.replace(sadr, verify=True)
    verdicts[:] = [True]
    with edit(model, EIFFEL, "rome", cfg, sadr=verified) as kept:
        assert kept.fallback is None and torch.equal(next(iter(kept.deltas.values())), sadr_delta)
    verdicts[:] = [False, True]
    with edit(model, EIFFEL, "rome", cfg, sadr=verified) as fell:
        assert fell.fallback == "plain" and torch.equal(next(iter(fell.deltas.values())), plain_delta)
        assert fell.sadr_records == [{}] and fell.config.clamp_norm_factor == cfg.clamp_norm_factor
    verdicts[:] = [False, False]
    with edit(model, EIFFEL, "rome", cfg, sadr=verified) as wider:
        assert wider.fallback == "plain-clamp2" and wider.config.clamp_norm_factor == 2 * cfg.clamp_norm_factor
    assert verdicts == []  # checked before each fallback, never after the last one
    assert api.EditResult.load(wider.save(tmp_path / "edit.pt"), model).fallback == "plain-clamp2"


def test_output_target_term_keeps_the_new_target_from_gaining_on_distract_prompts(stats):
    """With the term, the new target's log-probability at the end of the distract prompts rises
    less than with the plain edit (measured by full forwards of the edited models)."""
    model = tiny_model("llama", n_layers=3)
    sadr = SADRConfig(weight=0.0, distract=True, output_weight=100.0, steps=12)
    plain, restricted, _ = _target_rises(model, distract_prompts(EIFFEL), sadr, stats)
    assert plain > 0  # the plain edit pulls the distract prompts toward the new target
    assert restricted < 0.5 * plain


def _target_rises(model, prompts, sadr: SADRConfig, stats) -> tuple[float, float, dict]:
    """How far EIFFEL's new target's log-probability (summed over ``prompts``, full forwards) rises under a
    plain 12-step ROME edit and under the same edit with ``sadr``, and the latter's SADR record."""
    from attention_drift.core.scores import continuation_log_probs

    def target_lp():
        return float(continuation_log_probs(model, prompts, [EIFFEL.target_new] * len(prompts)).sum())

    before = target_lp()
    cfg = dataclasses.replace(_config("rome", stats), steps=12)
    with edit(model, EIFFEL, "rome", cfg):
        plain = target_lp()
    with edit(model, EIFFEL, "rome", cfg, sadr=sadr) as result:
        restricted = target_lp()
    return plain - before, restricted - before, result.sadr_records[0]


# ------------------------------------------------------------- SADR+'s verify, with the real check

JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")  # the tiny model's new target
JORDAN_BACK = Rewrite("Michael Jordan plays", "Michael Jordan", "basketball", "soccer")  # wins / loses before it


def _verify_config(stats, clamp: float) -> ROMEConfig:
    """ROME on the 3-layer tiny model with a clamp that binds: at 8 the plain edit of JORDAN_BACK
    cannot make "basketball" win (the margin moves from -0.32 to -0.08), at 16 it can (+0.24)."""
    return ROMEConfig(layer=1, stats=stats, steps=20, lr=0.5, clamp_norm_factor=clamp, context_templates=((4, 2),),
                      weight_decay=0.0)


def _margin(model, request: Rewrite) -> float:
    """log p(new) - log p(true) on the request's prompt (mean per target token), scored directly."""
    from attention_drift.core.scores import continuation_log_probs

    lp = continuation_log_probs(model, [request.prompt] * 2, [request.target_new, request.target_true])
    return float(lp[0] - lp[1])


def _edited(model, request, cfg, sadr=None) -> tuple[float, list]:
    """(margin inside the edit, the edited weights of every block) of an edit without verify."""
    with edit(model, request, "rome", cfg, sadr=sadr, progress=False):
        return _margin(model, request), [b.mlp.out.weight.detach().clone() for b in model.blocks]


@pytest.mark.parametrize("request_, clamp, output_weight, stage", [
    (JORDAN, 8.0, 1.0, None),                  # the SADR+ edit holds: kept
    (JORDAN_BACK, 16.0, 100.0, "plain"),       # the SADR+ edit (output term x100) fails, the plain edit holds
    (JORDAN_BACK, 8.0, 1.0, "plain-clamp2"),   # SADR+ and plain fail at clamp 8; plain at clamp 16 holds
], ids=["kept", "plain", "plain-clamp2"])
def test_verify_runs_the_real_check_and_keeps_the_first_edit_that_holds(request_, clamp, output_weight, stage, stats):
    """SADR+ with ``verify`` and the real check (api._requests_hold, nothing patched): each stage's
    edit is first made on its own (without verify) and scored directly; the expected stage is the
    first whose edit makes the new target win, and every one of those margins is at least 0.02 from
    the decision (float noise is ~1e-6), so which stage is kept is fixed by the construction. The
    verified edit must keep exactly that stage: its fallback, config and weights (bitwise)."""
    model = tiny_model("llama", n_layers=3)
    cfg = _verify_config(stats, clamp)
    original = [b.mlp.out.weight.detach().clone() for b in model.blocks]
    sadr = SADRConfig(weight=0.0, steps=20, distract=True, output_weight=output_weight, output="contrast")
    before = _margin(model, request_)
    candidates = {None: (cfg, sadr), "plain": (cfg, None),
                  "plain-clamp2": (dataclasses.replace(cfg, clamp_norm_factor=2 * clamp), None)}
    stages = {}
    for name, (stage_cfg, stage_sadr) in candidates.items():  # in order, up to the first that holds
        stages[name] = _edited(model, request_, stage_cfg, stage_sadr)
        if stages[name][0] > 0:
            break
    margins = {k: m for k, (m, _) in stages.items()}
    assert all(abs(m) > 0.02 for m in [before, *margins.values()]), margins
    assert list(margins)[-1] == stage and margins[stage] > 0, margins  # the construction: which stage holds first
    assert (before > 0) == (request_ is JORDAN)

    with edit(model, request_, "rome", cfg, sadr=dataclasses.replace(sadr, verify=True), progress=False) as result:
        assert result.fallback == stage
        assert all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, stages[stage][1]))
        assert _margin(model, request_) == pytest.approx(margins[stage], abs=1e-6) and _margin(model, request_) > 0
        expected_clamp = 2 * clamp if stage == "plain-clamp2" else clamp
        assert result.config.clamp_norm_factor == expected_clamp
        assert (result.sadr_records[0] != {}) == (stage is None)  # a fallback edit ran without the SADR term
    assert all(torch.equal(b.mlp.out.weight, w) for b, w in zip(model.blocks, original))


def test_evaluate_line_of_sadr_plus_carries_the_fallback(stats, monkeypatch):
    """An evaluation run line of the SADR+ variant (``sadr_variant("plus", "rome")``, verify on) says
    which edit was kept, here with the real check: None for JORDAN, "plain-clamp2" for JORDAN_BACK
    (see the test above; tiny-model preset with the clamp at 8); post-edit efficacy holds for both.
    Without verify the line has no fallback field."""
    import json

    from attention_drift.core.data import PromptGroup, Record
    from attention_drift.editing import config as config_module
    from attention_drift.runs.evaluation import evaluate_record_line
    from attention_drift.runs.variants import Variant, sadr_variant

    model = tiny_model("llama", n_layers=3)
    rome = {k: getattr(_verify_config(stats, 8.0), k) for k in
            ("layer", "steps", "lr", "clamp_norm_factor", "context_templates", "weight_decay")}
    monkeypatch.setitem(config_module._PRESETS, ("llama", 3, 64), {
        "rome": rome, "memit": dict(layers=(0, 1)), "pmet": dict(layers=(0, 1)), "stats": stats})
    plus = Variant("rome-sadr-plus", "rome", sadr_variant("plus", "rome"))
    assert plus.sadr.verify and plus.sadr.output_weight == 1.0
    resolved = plus.resolve(model)
    assert resolved[1].verify and resolved[0].clamp_norm_factor == 8.0

    def record(case_id, rewrite):
        empty = PromptGroup()
        return Record(case_id, "counterfact", rewrite, PromptGroup((rewrite.prompt,), (rewrite.target_new,)), empty,
                      empty, empty, PromptGroup(("The Louvre is in",), ("Paris",)), empty, None, ())

    lines = {r.case_id: json.loads(json.dumps(evaluate_record_line(model, r, plus, resolved)))
             for r in (record(1, JORDAN), record(2, JORDAN_BACK))}
    assert lines[1]["sadr"]["fallback"] is None and "fallback" in lines[1]["sadr"]
    assert lines[2]["sadr"]["fallback"] == "plain-clamp2"
    efficacy = {k: (line["pre"]["groups"]["efficacy"]["scores"][0][2], line["post"]["groups"]["efficacy"]["scores"][0][2])
                for k, line in lines.items()}
    assert efficacy == {1: (True, True), 2: (False, True)}
    unverified = Variant("rome-sadr-plus", "rome", sadr_variant("plus", "rome", verify=False))
    line = evaluate_record_line(model, record(2, JORDAN_BACK), unverified, unverified.resolve(model))
    assert "fallback" not in line["sadr"] and line["post"]["groups"]["efficacy"]["scores"][0][2] is False


def test_verify_fallbacks_of_an_editor_without_a_clamp_are_the_plain_edit_only():
    """A registered editor whose config has no ``clamp_norm_factor`` still gets the ``plain`` stage."""
    from attention_drift.editing.api import _fallbacks

    @dataclasses.dataclass(frozen=True)
    class NoClamp:
        steps: int = 3

    assert _fallbacks(NoClamp(), ()) == [("plain", NoClamp(), ())]
    clamped = _fallbacks(ROMEConfig(layer=1, clamp_norm_factor=4.0), ())
    assert [name for name, _, _ in clamped] == ["plain", "plain-clamp2"] and clamped[1][1].clamp_norm_factor == 8.0


def test_guard_mention_rows_take_the_delta_at_both_subject_occurrences(stats):
    """A guard row mentions the subject, then asks its own prompt: the edited MLP fires at both
    occurrences, so the optimisation adds the delta at both (``also_at``)."""
    from attention_drift.editing.optimize import rewriting_setup

    model = tiny_model("llama", n_layers=3)
    sadr = SADRLoss(SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="contrast",
                               distract_forms=("edit", "mention"), guard_weight=1.0, guard_mentions=True))
    setup = rewriting_setup(model, EIFFEL, ["{}"], 1, [sadr])
    n_distract = 6
    assert len(setup.batch) == setup.n_rewriting + 1 + 3 + n_distract
    own_rows = list(range(setup.n_rewriting + 1, setup.n_rewriting + 4))
    assert len(own_rows) == 3 and [r for r, _ in setup.also_at] == own_rows
    for row, position in setup.also_at:
        assert position > int(setup.subject_last[row])  # the question's occurrence, after the mention's
    distract, own = sadr._split_extra(setup.info)
    assert own.tolist() == own_rows and len(distract) == n_distract
    # guard rows first (rewriting rows, then the mention rows), then the distract rows
    assert setup.output_rows.tolist() == [*range(setup.n_rewriting), *own_rows, *distract.tolist()]
    with pytest.raises(SADRError, match="guard_weight"):
        SADRConfig(guard_mentions=True)


def test_guard_rows_naming_other_subjects_end_in_the_own_prompt_and_are_guarded(stats):
    """``guard_others``: one row per other subject, a sentence naming it, then the request's own
    prompt; guarded (after the mention rows), the edited subject once, so no second delta."""
    from attention_drift.editing.optimize import rewriting_setup
    from attention_drift.editing.sadr import DISTRACT_SUBJECTS, MENTIONS, guard_prompts

    rows = guard_prompts(EIFFEL, mentions=False, others=True)
    others = [s for s in DISTRACT_SUBJECTS if s != EIFFEL.subject]
    assert rows == [f"{MENTIONS[i].format(subject=s)} {EIFFEL.prompt}" for i, s in enumerate(others)]
    assert len(guard_prompts(EIFFEL, mentions=True, others=True)) == len(MENTIONS) + len(others)
    assert guard_prompts(EIFFEL, mentions=False, others=False) == []
    model = tiny_model("llama", n_layers=3)
    sadr = SADRLoss(SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="contrast",
                               distract_forms=("edit", "mention"), guard_weight=1.0, guard_mentions=True,
                               guard_others=True))
    setup = rewriting_setup(model, EIFFEL, ["{}"], 1, [sadr])
    n_guard, n_distract = len(MENTIONS) + len(others), 2 * len(others)
    assert len(setup.batch) == setup.n_rewriting + 1 + n_guard + n_distract
    guard_rows = list(range(setup.n_rewriting + 1, setup.n_rewriting + 1 + n_guard))
    assert [r for r, _ in setup.also_at] == guard_rows[:len(MENTIONS)]  # the other-subject rows name it once
    distract, own = sadr._split_extra(setup.info)
    assert own.tolist() == guard_rows and len(distract) == n_distract
    assert setup.output_rows.tolist() == [*range(setup.n_rewriting), *guard_rows, *distract.tolist()]
    with pytest.raises(SADRError, match="guard_others adds rows"):
        SADRConfig(guard_others=True)


def test_an_edit_with_mention_rows_and_their_guard_runs_and_holds(stats):
    model = tiny_model("llama", n_layers=3)
    sadr = SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="contrast", steps=STEPS,
                      distract_forms=("edit", "mention"), guard_weight=1.0, guard_mentions=True)
    with edit(model, EIFFEL, "rome", _config("rome", stats), sadr=sadr) as result:
        record = result.sadr_records[0]
        assert record["distract_rows"] == 6
        assert len(record["guard_loss"]) == len(record["output_loss"]) == result.traces[0].steps_run
        assert record["output_loss"][0] == 0.0  # no delta yet: nothing gained on the distract rows


def test_attention_and_output_terms_read_only_their_forms_rows(stats):
    """``attention_forms`` / ``output_forms`` pick distract rows by form: here the attention term reads
    only the mention rows (``distract_only``: no rewriting row) and the output term only the edit
    sentence's rows, which :func:`distract_prompts` lists first."""
    model = tiny_model("llama", n_layers=3)
    split = SADRConfig(weight=1.0, steps=STEPS, distract_only=True, distract_forms=("edit", "mention"),
                       attention_forms=("mention",), output_forms=("edit",), output_weight=1.0, output="contrast")
    loss = SADRLoss(split)
    prompts = loss.extra_prompts(EIFFEL)
    n = len(prompts) // 2
    assert prompts[:n] == distract_prompts(EIFFEL, forms=("edit",))
    assert prompts[n:] == distract_prompts(EIFFEL, forms=("mention",))
    from types import SimpleNamespace

    info = SimpleNamespace(extra_rows=torch.arange(4, 4 + 2 * n), n_rewriting=3)
    assert loss._distract_rows(info, split.attention_forms).tolist() == list(range(4 + n, 4 + 2 * n))
    assert loss.output_rows(info).tolist() == list(range(4, 4 + n))
    with edit(model, EIFFEL, "rome", _config("rome", stats), sadr=split) as result:
        record = result.sadr_records[0]
    assert all(mask.shape[0] == n for mask in record["mask"])
    assert max(record["loss"][1:]) > 0.0


@pytest.mark.parametrize("kwargs", [
    {"attention_forms": ("mention",)},  # no distract rows at all
    {"distract": True, "attention_forms": ("mention",)},  # not among distract_forms
    {"distract": True, "distract_forms": ("edit", "mention"), "output_forms": ()},
])
def test_term_forms_must_be_some_of_the_distract_forms(kwargs):
    with pytest.raises(SADRError, match="_forms"):
        SADRConfig(**kwargs)


def test_null_direction_keeps_the_kept_keys_and_zeroes_the_null_keys_with_the_least_move():
    from attention_drift.editing.rome import null_direction

    g = torch.Generator().manual_seed(0)
    d = 12
    a = torch.randn(d, d, generator=g, dtype=torch.double)
    inverse = torch.linalg.inv(a @ a.T + d * torch.eye(d, dtype=torch.double))
    u = torch.randn(d, generator=g, dtype=torch.double)
    keep, null = torch.randn(2, d, generator=g, dtype=torch.double), torch.randn(3, d, generator=g, dtype=torch.double)
    moved = null_direction(u, inverse, keep, null)
    torch.testing.assert_close(keep @ moved, keep @ u)
    torch.testing.assert_close(null @ moved, torch.zeros(3, dtype=torch.double), atol=1e-10, rtol=0)
    # the least move in the C metric: every other point that meets the constraints lies farther from u
    keys = torch.cat([keep, null])
    free = torch.linalg.svd(keys)[2][len(keys):]  # directions z with keys @ z = 0
    cov = torch.linalg.inv(inverse)
    least = (moved - u) @ cov @ (moved - u)
    for z in free:
        other = moved + 0.1 * z
        torch.testing.assert_close(keys @ other, keys @ moved)
        assert (other - u) @ cov @ (other - u) > least
    torch.testing.assert_close(null_direction(u, inverse, keep, null[:0]), u)  # no null key: u as it was (keep holds)


def test_key_nulls_leave_the_edited_layer_unmoved_at_the_subject_of_a_mention(stats):
    """With ``key_nulls`` the ROME update does not answer the subject's key in those sentences: the edited
    MLP's output there is what it was, while the bare prompt's key still maps to the new value."""
    from attention_drift.core.hooks import act_name
    from attention_drift.editing.rome import subject_keys

    model = tiny_model("llama", n_layers=3)
    config = _config("rome", stats)
    mention = "Here is some news about {subject}."
    sadr = SADRConfig(weight=0.0, steps=STEPS, distract=True, output_weight=1.0, output="contrast",
                      key_nulls=(mention,))
    hook = act_name("mlp_out", config.layer)
    texts = [mention.format(subject=EIFFEL.subject), EIFFEL.prompt]
    before = subject_keys(model, texts, EIFFEL.subject, hook)
    with edit(model, EIFFEL, "rome", config, sadr=sadr):
        after = subject_keys(model, texts, EIFFEL.subject, hook)
    with edit(model, EIFFEL, "rome", config, sadr=replace(sadr, key_nulls=())):
        plain = subject_keys(model, texts, EIFFEL.subject, hook)
    torch.testing.assert_close(after[0], before[0], atol=1e-4, rtol=1e-4)
    assert float((plain[0] - before[0]).norm()) > 100 * float((after[0] - before[0]).norm())
    assert float((after[1] - before[1]).norm()) > 0.1 * float(before[1].norm())  # the edit itself still lands


@pytest.mark.parametrize("method", ["memit", "pmet"])
def test_key_nulls_keep_every_layer_of_a_batched_update_off_the_mentions_key(stats, method):
    """MEMIT / PMET with ``key_nulls``: each edited layer's weight change maps the subject's key in the
    mention (that layer's key, on the edited model) to zero, while it still moves the bare prompt's key;
    without key_nulls it answers the mention too."""
    from attention_drift.core.hooks import act_name, mlp_weight_name
    from attention_drift.editing.rome import subject_keys

    model = tiny_model("llama", n_layers=3)
    config = replace(_config(method, stats), layers=(0, 1))
    mention = "Here is some news about {subject}."
    texts = [mention.format(subject=EIFFEL.subject), EIFFEL.prompt]
    sadr = SADRConfig(weight=0.0, steps=STEPS, distract=True, output_weight=1.0, output="contrast",
                      key_nulls=(mention,))
    names = {layer: mlp_weight_name(layer) for layer in config.layers}
    before = {layer: model.get_parameter(name).detach().clone() for layer, name in names.items()}

    def responses(nulls):
        with edit(model, EIFFEL, method, config, sadr=replace(sadr, key_nulls=nulls)):
            out = []
            for layer, name in names.items():
                delta = (model.get_parameter(name).detach() - before[layer]).double()
                keys = subject_keys(model, texts, EIFFEL.subject, act_name("mlp_post", layer))
                out.append((keys @ delta.T).norm(dim=-1))  # [mention, bare]
            return torch.stack(out)

    nulled, plain = responses((mention,)), responses(())
    assert (nulled[:, 0] < 1e-3 * nulled[:, 1]).all(), nulled  # float32 weights: the delta is read to ~1e-5
    assert (plain[:, 0] > 0.05 * plain[:, 1]).all(), plain
    assert (nulled[:, 1] > 0.2 * plain[:, 1]).all()  # the bare key still moves (in a random model its key is close to the mention's)


def test_key_nulls_must_name_the_subject_and_fit_a_key_value_editor(stats):
    with pytest.raises(SADRError, match="key_nulls"):
        SADRConfig(key_nulls=("no subject here.",))
    from attention_drift.editing import ConfigError

    model = tiny_model("llama", n_layers=2)
    with pytest.raises(ConfigError, match="key_nulls.*'alphaedit'"):
        resolve_edit(model, "alphaedit", None, SADRConfig(key_nulls=("About {subject}.",)))


def test_key_keeps_hold_the_rome_update_at_their_keys_to_the_plain_edits():
    """With ``key_keeps`` beside the nulls, the edited layer's change at the subject of a keep statement is
    the one it gets without any nulls (the value is optimised alike; ``u . k`` is held for those keys)."""
    from attention_drift.core.hooks import act_name
    from attention_drift.editing.rome import subject_keys

    model = tiny_model("llama", n_layers=3)
    stats = StatsConfig(corpus="model", n_samples=32, seq_len=24)
    config = _config("rome", stats)
    keep = "It rained all day. {prompt}"
    sadr = SADRConfig(weight=0.0, steps=STEPS, key_nulls=("Here is some news about {subject}.",), key_keeps=(keep,))
    hook = act_name("mlp_out", config.layer)
    text = [keep.format(prompt=EIFFEL.prompt)]
    before = subject_keys(model, text, EIFFEL.subject, hook)
    with edit(model, EIFFEL, "rome", config, sadr=sadr):
        kept = subject_keys(model, text, EIFFEL.subject, hook) - before
    with edit(model, EIFFEL, "rome", config, sadr=replace(sadr, key_nulls=(), key_keeps=())):
        plain = subject_keys(model, text, EIFFEL.subject, hook) - before
    with edit(model, EIFFEL, "rome", config, sadr=replace(sadr, key_keeps=())):
        nulled = subject_keys(model, text, EIFFEL.subject, hook) - before
    torch.testing.assert_close(kept, plain, atol=1e-4, rtol=1e-3)
    assert float((nulled - plain).norm()) > 10 * float((kept - plain).norm())  # the nulls alone move it


def test_key_keeps_must_hold_the_prompt_and_come_with_nulls():
    with pytest.raises(SADRError, match="key_keeps"):
        SADRConfig(key_nulls=("About {subject}.",), key_keeps=("No prompt here.",))
    with pytest.raises(SADRError, match="key_keeps"):
        SADRConfig(key_keeps=("It rained. {prompt}",))


def test_least_squares_update_with_keep_keys_holds_them_and_is_the_constrained_optimum():
    """``Delta N = 0`` and ``Delta P`` equal to the unconstrained update's; any other update meeting both costs more."""
    from attention_drift.editing.memit import least_squares_update

    model = tiny_model("llama", n_layers=2)
    g = torch.Generator().manual_seed(1)
    d_mlp, d_model = 10, 4
    a = torch.randn(d_mlp, d_mlp, generator=g, dtype=torch.double)
    cov = a @ a.T / d_mlp + torch.eye(d_mlp, dtype=torch.double)
    keys, null, keep = (torch.randn(n, d_mlp, generator=g, dtype=torch.double) for n in (3, 2, 2))
    residuals = torch.randn(3, d_model, generator=g, dtype=torch.double)
    free_upd = least_squares_update(model, 0, keys, residuals, cov, 1.5)
    upd = least_squares_update(model, 0, keys, residuals, cov, 1.5, null, keep)
    torch.testing.assert_close(upd @ null.T, torch.zeros(d_model, 2, dtype=torch.double), atol=1e-10, rtol=0)
    torch.testing.assert_close(upd @ keep.T, free_upd @ keep.T)
    assert float((least_squares_update(model, 0, keys, residuals, cov, 1.5, null) @ keep.T - free_upd @ keep.T).norm()) > 1e-3

    def cost(delta):
        return float(((delta @ keys.T - residuals.T) ** 2).sum() + 1.5 * torch.trace(delta @ cov @ delta.T))

    free = torch.linalg.svd(torch.cat([null, keep]))[2][4:]
    for z in free[:3]:
        assert cost(upd + 0.05 * torch.outer(torch.randn(d_model, generator=g, dtype=torch.double), z)) > cost(upd)


def test_least_squares_update_with_null_keys_is_the_constrained_optimum():
    """Under ``Delta N = 0`` the update minimises ``|Delta K - R|^2 + lambda tr(Delta C Delta^T)``: it meets the
    constraint, and every other update that meets it (a step in a free direction) costs more."""
    from attention_drift.editing.memit import least_squares_update

    model = tiny_model("llama", n_layers=2)
    g = torch.Generator().manual_seed(0)
    d_mlp, d_model = 10, 4
    a = torch.randn(d_mlp, d_mlp, generator=g, dtype=torch.double)
    cov = a @ a.T / d_mlp + torch.eye(d_mlp, dtype=torch.double)
    keys, null = torch.randn(3, d_mlp, generator=g, dtype=torch.double), torch.randn(2, d_mlp, generator=g, dtype=torch.double)
    residuals = torch.randn(3, d_model, generator=g, dtype=torch.double)
    upd = least_squares_update(model, 0, keys, residuals, cov, 1.5, null)
    torch.testing.assert_close(upd @ null.T, torch.zeros(d_model, 2, dtype=torch.double), atol=1e-10, rtol=0)

    def cost(delta):
        return float(((delta @ keys.T - residuals.T) ** 2).sum() + 1.5 * torch.trace(delta @ cov @ delta.T))

    free = torch.linalg.svd(null)[2][len(null):]  # z with null @ z = 0
    for z in free[:3]:
        other = upd + 0.05 * torch.outer(torch.randn(d_model, generator=g, dtype=torch.double), z)
        assert cost(other) > cost(upd)
    torch.testing.assert_close(least_squares_update(model, 0, keys, residuals, cov, 1.5, null[:0]),
                               least_squares_update(model, 0, keys, residuals, cov, 1.5))


# ------------------------------------------------------------------- relation rows (round 10)

def test_relation_rows_leave_out_the_edits_own_relation_and_take_each_form():
    """A relation prompt whose stems name the request's relation is left out; the rest come bare, then
    after the edit sentence, with the request's subject."""
    from attention_drift.editing.sadr import RELATION_PROMPTS, relation_prompts

    born = Rewrite("Michael Jordan was born in", "Michael Jordan", "Paris", "Brooklyn")
    rows = relation_prompts(born, RELATION_PROMPTS, ("bare", "edit"))
    kept = [t.format(subject="Michael Jordan") for t in RELATION_PROMPTS if "born" not in t]
    assert rows == kept + [f"Michael Jordan was born in Paris. {p}" for p in kept]
    job = Rewrite("Michael Jordan works as a", "Michael Jordan", "dentist", "athlete")
    assert "The occupation of Michael Jordan is" not in relation_prompts(job, RELATION_PROMPTS, ("bare",))
    # a template not in RELATION_STEMS is left out by its own long words
    assert relation_prompts(job, ("{subject} works hard", "{subject} likes"), ("bare",)) == ["Michael Jordan likes"]


@pytest.mark.parametrize("kwargs", [
    dict(relation_weight=1.0), dict(relation_prompts=("{subject} likes",), relation_forms=("bare",)),
    dict(relation_prompts=("likes",), relation_forms=("bare",), relation_weight=1.0),
    dict(relation_prompts=("{subject} likes",), relation_forms=("mention",), relation_weight=1.0),
])
def test_relation_rows_config_is_checked(kwargs):
    with pytest.raises(SADRError, match="relation rows"):
        SADRConfig(**kwargs)


def test_relation_rows_follow_the_distract_rows_and_keep_the_new_target_from_gaining(stats):
    """The relation rows come last in the batch and in the output rows (the distract rows keep theirs);
    their term is 0 before the edit, and with a large weight the new target gains less on them than
    under the plain edit (full forwards of the edited models)."""
    from attention_drift.editing.optimize import rewriting_setup
    from attention_drift.editing.sadr import RELATION_PROMPTS, relation_prompts

    model = tiny_model("llama", n_layers=3)
    config = SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="contrast", steps=12,
                        relation_prompts=RELATION_PROMPTS, relation_forms=("bare", "edit"), relation_weight=100.0)
    loss = SADRLoss(config)
    setup = rewriting_setup(model, EIFFEL, ["{}"], 1, [loss])
    relations = relation_prompts(EIFFEL, RELATION_PROMPTS, ("bare", "edit"))
    distract, _ = loss._split_extra(setup.info)
    assert len(distract) == len(distract_prompts(EIFFEL)) and len(relations) == 2 * len(RELATION_PROMPTS)
    tail = list(range(len(setup.batch) - len(relations), len(setup.batch)))
    assert setup.output_rows.tolist() == [*distract.tolist(), *tail]
    assert [r for r, _ in setup.also_at] == tail[len(RELATION_PROMPTS):]  # the edit form names the subject twice

    plain, restricted, record = _target_rises(model, relations, config, stats)
    assert record["relation_loss"][0] == 0.0 and max(record["relation_loss"]) > 0.0
    assert plain > 0
    assert restricted < 0.5 * plain
