import contextlib
import json
import math

import numpy as np
import pytest
import torch

from attention_drift import tokens
from attention_drift.data import distract_prompt, load_example
from attention_drift.drift import (
    FACTORS,
    DriftError,
    HeadDrift,
    Regions,
    binned_curve,
    collect_attention_rows,
    dataset_drift,
    measure_drift,
    auroc,
    pearson,
    row_kl,
    spearman,
    t_two_sided_p,
)
from attention_drift.models import mlp_out_weight

from handmade_edit import push_subject  # noqa: E402

RECORDS = load_example()
EIFFEL = RECORDS[0]   # counterfact: neighbourhood prompts without the subject
OBAMA = RECORDS[3]    # wikidata: relation prompts that mention the subject again


def _distract(record, group="neighborhood"):
    prompts = getattr(record, group)
    return [distract_prompt(record.rewrite, p) for p in prompts.prompts], list(prompts.targets)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


def test_no_change_gives_exactly_zero_drift(model):
    prompts, targets = _distract(EIFFEL)
    drift = measure_drift(model, EIFFEL.rewrite, prompts, contextlib.nullcontext, targets)
    before, after = drift.mass("subject_last")
    assert torch.equal(before, after)
    assert torch.equal(drift.kl(), torch.zeros_like(drift.kl()))
    assert torch.equal(drift.scores_before.lp_true, drift.scores_after.lp_true)
    hd = drift.head_drift(0)
    assert hd.delta.abs().max() == 0 and hd.kl.abs().max() == 0
    assert hd.before.shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_edit_moves_attention_above_the_edited_layer_only(model):
    prompts, targets = _distract(EIFFEL)
    weight = mlp_out_weight(model, 0).detach().clone()
    drift = measure_drift(model, EIFFEL.rewrite, prompts, lambda: push_subject(model, EIFFEL.rewrite), targets)
    assert torch.equal(mlp_out_weight(model, 0), weight)
    kl = drift.kl()
    # layer 0's attention runs before the edited MLP of layer 0: untouched, exactly.
    assert torch.equal(kl[:, 0], torch.zeros_like(kl[:, 0]))
    assert kl[:, 1].max() > 1e-6
    before, after = drift.mass("subject_last")
    assert (after - before)[:, 1].abs().max() > 1e-6
    assert not torch.allclose(drift.scores_after.logodds, drift.scores_before.logodds)
    factors = drift.factors()
    assert set(factors) == set(FACTORS)
    delta = (after - before).flatten(1)
    assert torch.allclose(factors["max_drift_subject_last"], delta.max(-1).values)
    assert torch.allclose(factors["sum_drift_subject_last"], delta.sum(-1))
    assert torch.isnan(factors["max_drift_prompt_subject_last"]).all()  # neighbour prompts lack the subject


def test_scores_come_from_the_same_pass_as_the_rows(model):
    prompts, targets = _distract(OBAMA, "relation")
    drift = measure_drift(model, OBAMA.rewrite, prompts, contextlib.nullcontext, targets)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        pairs = ((target, drift.scores_before.lp_true[i]), (OBAMA.rewrite.target_new, drift.scores_before.lp_new[i]))
        for answer, lp in pairs:
            batch = tokens.batch_with_targets(model, [prompt], [answer])
            with torch.no_grad():
                alone = tokens.target_log_probs(model(batch.input_ids), batch)[0]
            assert lp.item() == pytest.approx(alone.item(), abs=1e-5)
        rows = collect_attention_rows(model, [prompt]).rows[0]
        torch.testing.assert_close(drift.before.rows[i, ..., : rows.shape[-1]], rows, atol=1e-6, rtol=0)


def test_kl_formula():
    before = torch.tensor([[0.5, 0.5, 0.0]])
    after = torch.tensor([[0.25, 0.5, 0.25]])
    expected = 0.5 * (math.log(0.5 + 1e-8) - math.log(0.25 + 1e-8)) + 0.5 * 0.0
    assert row_kl(before, after).item() == pytest.approx(expected, rel=1e-6)


def test_head_drift_top_ordering():
    before = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    after = torch.tensor([[0.4, 0.1], [0.3, 0.9]])
    kl = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    hd = HeadDrift(before, after, kl)
    top = hd.top(3)
    assert [(l, h) for l, h, *_ in top] == [(1, 1), (0, 0), (1, 0)]
    assert top[0] == pytest.approx((1, 1, 0.4, 0.9, 0.5))
    assert [(l, h) for l, h, *_ in hd.top(2, by="kl")] == [(0, 1), (1, 1)]
    assert [(l, h) for l, h, *_ in hd.top(1, by="abs_delta")] == [(1, 1)]
    with pytest.raises(DriftError, match="choose from"):
        hd.top(1, by="nope")


def test_batched_rows_equal_unbatched(model):
    prompts, _ = _distract(OBAMA, "relation")
    prompts.append("Paris")
    rows = collect_attention_rows(model, prompts)
    assert rows.rows.shape[:3] == (len(prompts), model.cfg.n_layers, model.cfg.n_heads)
    for i, prompt in enumerate(prompts):
        alone = collect_attention_rows(model, [prompt])
        n = int(alone.lengths[0])
        assert int(rows.lengths[i]) == n and int(rows.query[i]) == n - 1
        torch.testing.assert_close(rows.rows[i, :, :, :n], alone.rows[0], atol=1e-6, rtol=0)
        assert rows.rows[i, :, :, n:].abs().max() == 0 if rows.rows.shape[-1] > n else True
    sums = rows.rows.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_collect_rows_explicit_query(tiny_llama):
    prompts = ["The Louvre is in Paris.", "Toyota is headquartered in Japan."]
    rows = collect_attention_rows(tiny_llama, prompts, query=[2, 3])
    assert rows.query.tolist() == [2, 3]
    assert rows.rows[0, :, :, 3:].abs().max() == 0  # causal: query 2 sees keys 0..2
    with pytest.raises(DriftError, match="outside"):
        collect_attention_rows(tiny_llama, prompts, query=[2, 99])
    with pytest.raises(DriftError, match="one per prompt"):
        collect_attention_rows(tiny_llama, prompts, query=[2])


def test_regions_of_distract_prompt_with_subject_twice(tiny_gpt2):
    rewrite = OBAMA.rewrite
    text = distract_prompt(rewrite, OBAMA.relation.prompts[0])
    regions = Regions.of(tiny_gpt2, rewrite, text)
    ids = tokens.encode(tiny_gpt2, text)
    decode = lambda span: tiny_gpt2.tokenizer.decode(ids[span[0]:span[1] + 1])  # noqa: E731
    assert decode(regions.subject).strip() == "Barack Obama"
    assert regions.subject[1] < regions.edit_sentence[1]
    assert len(regions.prompt_subjects) == 1 and regions.prompt_subjects[0][0] > regions.edit_sentence[1]
    assert decode(regions.prompt_subjects[0]).strip() == "Barack Obama"
    assert decode(regions.edit_sentence).strip() == rewrite.edit_sentence
    assert decode(regions.target_new).strip() == rewrite.target_new
    assert regions.positions("last") == (len(ids) - 1,)
    assert regions.positions("subject_last") == (regions.subject[1],)
    assert regions.positions("prompt")[0] == regions.edit_sentence[1] + 1
    plain = Regions.of(tiny_gpt2, rewrite, OBAMA.relation.prompts[0])
    assert plain.edit_sentence is None and plain.target_new is None
    assert plain.prompt_subjects == (plain.subject,)
    with pytest.raises(DriftError, match="unknown region"):
        regions.positions("object")


def test_measure_drift_rejects_bad_input_before_editing(tiny_llama):
    calls = []

    def edit_fn():
        calls.append(1)
        return contextlib.nullcontext()

    with pytest.raises(DriftError, match="does not occur"):
        measure_drift(tiny_llama, EIFFEL.rewrite, list(EIFFEL.neighborhood.prompts), edit_fn)
    with pytest.raises(DriftError, match="one true answer per prompt"):
        measure_drift(tiny_llama, EIFFEL.rewrite, _distract(EIFFEL)[0], edit_fn, ["Paris"])
    assert not calls
    with pytest.raises(DriftError, match="context manager"):
        measure_drift(tiny_llama, EIFFEL.rewrite, _distract(EIFFEL)[0], lambda: 3)


def test_pearson_spearman_known_data():
    x = np.arange(10.0)
    perfect = pearson(x, 2 * x + 1)
    assert perfect.r == pytest.approx(1.0) and perfect.p_value == 0.0 and perfect.ci_low == pytest.approx(1.0)
    assert pearson(x, -x).r == pytest.approx(-1.0)
    assert spearman(x, np.exp(x)).r == pytest.approx(1.0)
    assert pearson(x, np.exp(x)).r < 0.99
    # NaN pairs dropped; constant input gives NaN rather than an exception.
    assert pearson([1, 2, float("nan"), 4, 5], [1, 2, 3, 4, 5]).n == 4
    assert math.isnan(pearson(x, np.ones(10)).r)
    # Fisher CI: r = 0.5, n = 28 -> z = 0.5493, se = 0.2.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=28), rng.normal(size=28)
    c = pearson(a, b)
    z = math.atanh(c.r)
    assert c.ci_low == pytest.approx(math.tanh(z - 1.959964 * 0.2), abs=1e-5)
    assert c.ci_high == pytest.approx(math.tanh(z + 1.959964 * 0.2), abs=1e-5)
    # p-value: t = r sqrt((n-2)/(1-r^2)) against a numerical integral of Student's t density.
    df = 26
    t = abs(c.r) * math.sqrt(df / (1 - c.r ** 2))
    grid = np.linspace(t, 200, 400001)
    dens = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    assert c.p_value == pytest.approx(2 * np.trapezoid(dens, grid), rel=1e-4)
    assert t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-5)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_spearman_ties_use_average_ranks():
    x = [1, 2, 2, 3, 4]
    y = [1, 2.5, 2.5, 4, 5]  # the average ranks of x
    assert spearman(x, y).r == pytest.approx(1.0)
    assert spearman(x, [5, 4, 3, 2, 1]).r == pytest.approx(pearson([1, 2.5, 2.5, 4, 5], [5, 4, 3, 2, 1]).r)


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(1.0)
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == pytest.approx(0.0)
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == pytest.approx(0.5)
    # pairs (pos, neg): (0.3 > 0.1), (0.3 < 0.4), (0.6 > 0.1), (0.6 > 0.4) -> 3 / 4
    assert auroc([0.1, 0.3, 0.4, 0.6, float("nan")], [0, 1, 0, 1, 1]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_binned_curve():
    factor = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, float("nan")]
    fails = [0, 0, 0, 1, 0, 1, 1, 1, 1]
    severity = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 9.0]
    curve = binned_curve(factor, fails, severity, n_bins=2)
    assert curve.count == (4, 4)
    assert curve.failure_rate == pytest.approx((0.25, 0.75))
    assert curve.mean_factor == pytest.approx((0.25, 0.65))
    assert curve.mean_severity == pytest.approx((0.15, 0.55))
    assert curve.edges[0] == pytest.approx(0.1) and curve.edges[-1] == pytest.approx(0.8)


def test_dataset_drift_report(tiny_llama):
    records = RECORDS[:4]
    edits = []

    def factory(record):
        edits.append(record.case_id)
        return push_subject(tiny_llama, record.rewrite)

    report = dataset_drift(tiny_llama, records, factory)
    n_prompts = sum(len(r.neighborhood) + len(r.relation) for r in records)
    assert len(report.samples) == n_prompts and edits == [r.case_id for r in records]
    assert {s.group for s in report.samples} == {"distract_neighborhood", "distract_relation"}
    stats = report.head_stats["delta_subject_last"]
    assert stats.mean.shape == (tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert stats.quantiles.shape == (3, tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert torch.equal(stats.mean[0], torch.zeros_like(stats.mean[0]))  # below the edit: no drift
    factor = [s.factors["max_drift_subject_last"] for s in report.samples]
    severity = [s.severity["logodds_drop"] for s in report.samples]
    assert report.correlations["all"]["max_drift_subject_last"]["logodds_drop"]["pearson"].r == \
        pytest.approx(pearson(factor, severity).r)
    relation = [s for s in report.samples if s.group == "distract_relation"]
    assert all(not math.isnan(s.factors["max_drift_prompt_subject_last"]) for s in relation)
    assert sum(report.curves["max_kl"].count) == n_prompts
    fails = [s.fails for s in report.samples]
    assert report.auroc["all"]["max_kl"] == pytest.approx(auroc([s.factors["max_kl"] for s in report.samples], fails))
    assert report.correlations["all"]["max_kl"]["fails"]["pearson"].n == n_prompts
    assert report.top_heads(3) == report.head_stats["delta_subject_last"].top(3)
    assert 0 <= report.failure_rate() <= 1
    blob = json.loads(json.dumps(report.to_dict()))
    assert blob["n_samples"] == n_prompts and "distract_relation" in blob["correlations"]


def test_dataset_drift_rejects_unknown_groups(tiny_llama):
    with pytest.raises(DriftError, match="unknown groups"):
        dataset_drift(tiny_llama, RECORDS, lambda r: contextlib.nullcontext(), groups=("paraphrase",))
    with pytest.raises(DriftError, match="no record"):
        dataset_drift(tiny_llama, RECORDS[:1], lambda r: contextlib.nullcontext(), groups=("neighborhood",))


@pytest.mark.slow
def test_smollm2_rome_edit_drifts_attention_onto_the_subject(smollm2):
    """ROME (Eiffel Tower -> Rome, layer 5) on SmolLM2: on the distract neighbourhood prompts some
    heads above the edited layer attend much more to "Tower", and the edited model fails there."""
    from attention_drift.editing import ROMEConfig, edit

    rewrite = EIFFEL.rewrite
    config = ROMEConfig(layer=5, clamp_norm_factor=2.0, mom2_adjustment=False, context_templates=((5, 2),))
    prompts, targets = _distract(EIFFEL)
    drift = measure_drift(smollm2, rewrite, prompts, lambda: edit(smollm2, rewrite, method="rome", config=config),
                          targets)
    before, after = drift.mass("subject_last")
    assert torch.equal(before[:, :6], after[:, :6])  # attention up to the edited layer is untouched
    factors = drift.factors()
    assert bool((factors["max_drift_subject_last"] > 0.1).all()), factors["max_drift_subject_last"]
    assert not drift.scores_before.prefers_new.any()
    assert drift.scores_after.prefers_new.any()
    top = drift.head_drift(int(factors["max_drift_subject_last"].argmax())).top(1)[0]
    assert top[0] > 5 and top[3] > top[2]
