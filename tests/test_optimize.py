"""Speed-related behaviour of the value optimisation: no logits in the reference pass, a
progress bar over the steps, float32 maths on a bfloat16 model."""

import pytest
import torch

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.editing import Objective, ROMEConfig, StatsConfig, apply_edit
from attention_drift.editing import optimize
from attention_drift.core import runner
from attention_drift.core.runner import LayerRunner, RunnerError, plan_packs, token_and_key_costs, unembed_rows
from attention_drift.editing.optimize import optimize_values, rewriting_batch
from attention_drift.core.hooks import act_name
from attention_drift.core.models import tiny_model
from attention_drift.editing.sadr import SADRConfig

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
    monkeypatch.setattr(runner, "_stop_before_final_norm", lambda module, args, kwargs: None)
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
        bar = "fine-tuning" if method == "ft" else "optimising value"  # FT optimises the weights themselves
        apply_edit(tiny_llama, EIFFEL, method, progress=False).restore()
        assert bar not in capsys.readouterr().err
        apply_edit(tiny_llama, EIFFEL, method, progress=True).restore()
        assert bar in capsys.readouterr().err, method


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # packed suffixes and full rows
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


def _distract_batch(model):
    from attention_drift.editing.sadr import distract_prompts

    templates = ["{}", "Paris is big. {}", "A very long prefix before the prompt. {}"]
    return rewriting_batch(model, EIFFEL, templates, extra_prompts=distract_prompts(EIFFEL))


@pytest.mark.parametrize("groups", [1, 2, None, 99], ids=["one-pack", "two-packs", "by-cost", "row-each"])
def test_packed_runner_equals_the_full_forward_on_rows_of_very_different_suffix_lengths(groups):
    """Rewriting rows (short suffixes) and SADR's distract rows (long ones) run packed (one
    sequence, several packs, or each row alone); with a delta added at each row's subject,
    every suffix position's logits and final residual, and the attention patterns mapped
    back by ``full_pattern``, are those of a full forward with the same delta."""
    model = tiny_model("llama", n_layers=3)
    batch, _, subj = _distract_batch(model)
    lengths = batch.attention_mask.sum(1)
    suffix = lengths - subj
    assert suffix.max() >= 3 * suffix.min()
    runner = LayerRunner(model, batch, 1, changes_from=subj, groups=groups)
    assert runner.layout == "packed"
    b = len(batch)
    expected_groups = {1: 1, 2: 2, 99: b}.get(groups)
    if expected_groups is not None:
        assert runner.groups == expected_groups
    rows = torch.arange(b)
    delta = torch.randn(model.cfg.d_model)
    mlp, pattern, final_name = act_name("mlp_raw", 1), act_name("pattern", 2), act_name("resid_post", 2)

    def inject(at):
        def fn(act, hook):
            act = act.clone()
            act[at] += delta
            return act
        return fn

    seen = {}
    save = lambda name: lambda act, hook: seen.__setitem__(name, act.detach())  # noqa: E731
    with torch.no_grad(), model.hooks(fwd_hooks=[(mlp, inject((rows, subj))), (pattern, save("full")),
                                                 (final_name, save("final"))]):
        full_logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad(), model.hooks(fwd_hooks=[(mlp, inject(runner.index(rows, subj))), (pattern, save("packed"))]):
        final, _ = runner.run()
    G, n_max = final.shape[:2]
    assert G == runner.groups and final.shape[2] == model.cfg.d_model
    assert torch.isfinite(final).all()  # padding slots of short packs too
    if groups == 1:
        assert n_max == int(suffix.sum())  # one sequence, no padding
    if groups == 99:
        assert n_max == int(suffix.max())  # each row alone, padded to the longest suffix
    assert seen["packed"].shape[:3] == (G, model.cfg.n_heads, n_max)
    real_rows, real_pos = [], []
    for r in range(b):
        real_rows += [r] * int(suffix[r])
        real_pos += range(int(subj[r]), int(lengths[r]))
    real_rows, real_pos = torch.tensor(real_rows), torch.tensor(real_pos)
    at = runner.index(real_rows, real_pos)
    assert len(set(zip(at[0].tolist(), at[1].tolist()))) == len(real_rows)  # one slot per token
    torch.testing.assert_close(final[at], seen["final"][real_rows, real_pos], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unembed_rows(model, final[at]), full_logits[real_rows, real_pos], atol=1e-5, rtol=1e-5)
    mapped = runner.full_pattern(seen["packed"])
    assert mapped.shape == seen["full"].shape
    for r in range(b):
        s, n = int(subj[r]), int(lengths[r])
        torch.testing.assert_close(mapped[r, :, s:n], seen["full"][r, :, s:n], atol=1e-6, rtol=1e-5)
        assert mapped[r, :, :s].abs().sum() == 0 and mapped[r, :, n:].abs().sum() == 0
    with pytest.raises(RunnerError, match="not run by the packed layer runner"):
        runner.index(torch.tensor([0]), torch.tensor([0]))  # before the subject


def test_packed_runner_stops_each_row_at_its_end():
    """Positions from ``ends`` on are not run (nothing reads them, and causal attention keeps
    them from reaching earlier ones): fewer tokens, and every position run equals the full
    forward."""
    model = tiny_model("llama", n_layers=3)
    batch, _, subj = _distract_batch(model)
    lengths = batch.attention_mask.sum(1)
    ends = torch.maximum(lengths - 2, subj + 1)
    whole = LayerRunner(model, batch, 1, changes_from=subj)
    cut = LayerRunner(model, batch, 1, changes_from=subj, ends=ends)
    assert cut.layout == "packed" and len(cut._rows) == int((ends - subj).sum()) < len(whole._rows)
    with torch.no_grad():
        final, _ = cut.run()
        reference, _ = whole.run()
    for r in range(len(batch)):
        run = torch.arange(int(subj[r]), int(ends[r]))
        rows = torch.full_like(run, r)
        torch.testing.assert_close(final[cut.index(rows, run)], reference[whole.index(rows, run)], atol=1e-5, rtol=1e-5)
    with pytest.raises(RunnerError, match="not run by the packed layer runner"):
        cut.index(torch.tensor([0]), lengths[:1] - 1)


def _fixed_groups(monkeypatch, groups, layouts):
    """Makes every LayerRunner use ``groups`` packs ("full": full rows) and records its layout."""
    init = LayerRunner.__init__

    def forced(self, *args, **kwargs):
        if groups == "full":
            init(self, *args, **{**kwargs, "changes_from": None})
        else:
            init(self, *args, **kwargs, groups=groups)
        layouts.append((self.layout, self.groups))

    monkeypatch.setattr(LayerRunner, "__init__", forced)


@pytest.mark.parametrize("sadr", [SADRConfig(weight=1.0, distract=True, steps=5),
                                  SADRConfig(weight=0.0, distract=True, output_weight=1.0, output="both", steps=5)],
                         ids=["attention", "output"])
def test_distract_sadr_edit_is_the_same_packed_as_on_full_rows(sadr, monkeypatch):
    """The packed layout is only faster: a ROME+SADR edit with distract rows (attention term,
    or the output term reading ``acts[OUTPUT]``) gives the deltas and traces of full rows,
    whatever the number of packs (one sequence, two packs, chosen by cost, each row alone)."""
    model = tiny_model("llama", n_layers=3)
    results, layouts = {}, []
    for groups in ("full", 1, 2, None, 99):
        with monkeypatch.context() as patch:
            _fixed_groups(patch, groups, layouts)
            result = apply_edit(model, EIFFEL, "rome", _rome(context_templates=((4, 2), (8, 2))), sadr=sadr,
                                progress=False)
        result.restore()
        results[groups] = result
    assert [layout for layout, _ in layouts] == ["full"] + ["packed"] * 4
    assert [g for _, g in layouts][1:3] == [1, 2] and layouts[-1][1] == layouts[0][1]  # 99: one pack per row
    full = results["full"]
    name = "blocks.1.mlp.out.weight"
    assert full.deltas[name].abs().sum() > 0
    (tf,) = full.traces
    assert tf.records["sadr"]["distract_rows"] > 0 and max(tf.extra["sadr"]) > 0
    for groups in (1, 2, None, 99):
        packed = results[groups]
        torch.testing.assert_close(packed.deltas[name], full.deltas[name], atol=1e-5, rtol=1e-5)
        (tp,) = packed.traces
        assert tp.steps_run == tf.steps_run == 5
        assert tp.loss == pytest.approx(tf.loss, rel=1e-5, abs=1e-6)
        assert tp.extra["sadr"] == pytest.approx(tf.extra["sadr"], rel=1e-3, abs=1e-6)


# Suffix / prefix lengths of SmolLM2-135M's published ROME+SADR batch (21 rewriting rows, the
# essence row last) and of its distract batch (three distract rows after them).
_PUBLISHED = ([5] * 21 + [3], [3, 9, 9, 9, 9, 9, 8, 9, 9, 9, 9, 14, 13, 14, 14, 14, 14, 13, 14, 13, 14, 2])
_DISTRACT = (_PUBLISHED[0] + [12, 13, 11], _PUBLISHED[1] + [3, 3, 3])


def _plan_cost(packs, suffix, prefix, token_cost, key_cost):
    n = max(sum(suffix[r] for r in pack) for pack in packs)
    p = max(sum(prefix[r] for r in pack) for pack in packs)
    return len(packs) * n * (token_cost + key_cost * (p + n))


def test_plan_packs_forced_counts_and_rows_without_suffix():
    suffix, prefix = [5, 0, 5, 3], [10, 4, 9, 2]
    assert plan_packs(suffix, prefix, 1.0, 0.5, groups=1) == [[0, 2, 3]]  # row 1 runs nothing
    assert plan_packs(suffix, prefix, 1.0, 0.5, groups=9) == [[0], [2], [3]]
    assert plan_packs(suffix, prefix, 1.0, 0.5, groups=2) in ([[0], [2, 3]], [[0, 3], [2]])
    assert plan_packs([0, 0], [3, 4], 1.0, 0.5) == []


def test_plan_packs_trades_padding_against_attention_to_other_rows():
    suffix, prefix = _DISTRACT
    assert plan_packs(suffix, prefix, 1.0, 0.0) == [list(range(len(suffix)))]  # free attention: no padding
    rows_alone = plan_packs(*_PUBLISHED, 1.0, 1.0)  # equal suffixes, costly attention
    assert rows_alone == [[r] for r in range(len(_PUBLISHED[0]))]


@pytest.mark.parametrize("batch", [_PUBLISHED, _DISTRACT], ids=["published", "distract"])
def test_plan_packs_is_never_costlier_than_one_sequence_or_one_row_each(batch):
    """With the SmolLM2-135M cost model: the published batch runs no costlier than each row
    alone or one sequence, and the distract batch runs in packs clearly cheaper than both one
    sequence and padding every row to the distract rows' length."""
    suffix, prefix = batch
    costs = (3538944.0, 9 * (128.0 + runner.SCORE_ELEMENTWISE))  # SmolLM2-135M
    chosen = plan_packs(suffix, prefix, *costs)
    one = _plan_cost([list(range(len(suffix)))], suffix, prefix, *costs)
    each = _plan_cost([[r] for r in range(len(suffix))], suffix, prefix, *costs)
    cost = _plan_cost(chosen, suffix, prefix, *costs)
    assert sorted(r for pack in chosen for r in pack) == list(range(len(suffix)))
    assert cost <= min(one, each)
    if batch is _DISTRACT:
        assert cost < 0.9 * min(one, each) and 1 < len(chosen) < len(suffix)


def test_token_and_key_costs_of_a_gated_grouped_query_model(tiny_llama):
    token, key = token_and_key_costs(tiny_llama)  # 64 wide, 4 query heads and 2 KV heads of 16, gated MLP 128
    assert token == 2 * 64 * 64 + 2 * 64 * 2 * 16 + 3 * 64 * 128
    assert key == 4 * (2 * 16 + runner.SCORE_ELEMENTWISE)


def test_runner_rejects_a_non_positive_pack_count(tiny_llama):
    batch, _, subj = rewriting_batch(tiny_llama, EIFFEL, ["{}"])
    with pytest.raises(RunnerError, match="groups must be a positive"):
        LayerRunner(tiny_llama, batch, 1, changes_from=subj, groups=0)


JORDAN = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
LOUVRE = Rewrite("The Louvre is in the city of", "Louvre", "Berlin", "Paris")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("schedule", [False, True], ids=["memit", "pmet-schedule"])
def test_values_optimised_together_equal_each_request_alone(arch, schedule):
    """One batch for three requests gives each the deltas and trace of its own run, also when
    they stop at different steps (early stop, PMET's argmax schedule)."""
    from attention_drift.editing.optimize import optimize_values_many

    import dataclasses

    model = tiny_model(arch, n_layers=3)
    sites = [act_name("mlp_raw", 1)] + ([act_name("attn_raw", 1)] if schedule else [])
    objective = Objective(lr=0.1, steps=30, weight_decay=1e-6, clamp_norm_factor=50.0, kl_factor=0.0625,
                          early_stop_loss=0.0, argmax_schedule=schedule)
    templates = ["{}", "It is known. {}"]
    requests = [EIFFEL, JORDAN, LOUVRE]
    kw = dict(sites=sites, layer=1, reference_names=[act_name("mlp_post", 1)])
    final = sorted(optimize_values(model, r, templates, objective=objective, **kw).trace.loss[-1] for r in requests)
    # a stop between the lowest final loss and the next: one run stops early, the others run every step
    objective = dataclasses.replace(objective, early_stop_loss=(final[0] + final[1]) / 2)
    together = optimize_values_many(model, requests, templates, objective=objective, **kw)
    alone = [optimize_values(model, r, templates, objective=objective, **kw) for r in requests]
    assert len({len(a.trace.loss) for a in alone}) > 1  # the runs stop at different steps
    for t, a in zip(together, alone):
        assert t.trace.request == a.trace.request and t.trace.stopped_early == a.trace.stopped_early
        assert t.trace.loss == pytest.approx(a.trace.loss, rel=1e-4)
        assert t.trace.target_prob == pytest.approx(a.trace.target_prob, rel=1e-4)
        for s in sites:
            assert (t.delta[s].abs().sum() > 0) == (len(a.trace.loss) > 1)  # a stop at step 0 moves nothing
            torch.testing.assert_close(t.delta[s], a.delta[s], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(t.init[s], a.init[s])
        for n, ref in a.reference.items():
            torch.testing.assert_close(t.reference[n], ref)


def test_extra_loss_terms_need_one_request_at_a_time(tiny_llama):
    from attention_drift.editing.optimize import optimize_values_many
    from attention_drift.editing.config import EditError

    class Zero:
        name = "zero"

        def hook_names(self, info):
            return []

        def __call__(self, step, acts, info):
            return torch.zeros(())

    objective = Objective(lr=0.5, steps=2, weight_decay=0.0, clamp_norm_factor=4.0, kl_factor=0.0)
    with pytest.raises(EditError, match="one at a time"):
        optimize_values_many(tiny_llama, [EIFFEL, JORDAN], ["{}"], sites=[act_name("mlp_raw", 1)], layer=1,
                             objective=objective, extra_losses=[Zero()])
