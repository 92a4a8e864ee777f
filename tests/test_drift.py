import contextlib
import json
import math

import pytest
import torch

from attention_drift.core import tokens
from attention_drift.core.data import distract_prompt, load_example
from attention_drift.runs.analysis import dataset_drift
from attention_drift.measure.drift import (
    FACTORS,
    DriftError,
    DriftSample,
    HeadCapture,
    HeadDrift,
    RecordDrift,
    collect_attention_rows,
    drift_record,
    measure_drift,
    row_kl,
)
from attention_drift.reports.drift import HEADLINE_FACTORS, drift_report
from attention_drift.reports.stats import auroc, auroc_ci, pearson, spearman
from attention_drift.core.regions import RegionError, Regions
from attention_drift.core.models import mlp_out_weight
from attention_drift.reports.drift import drift_from_lines

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


def test_true_top1_before_is_the_unedited_argmax(model):
    prompts, _ = _distract(EIFFEL)
    with torch.no_grad():
        tops = [int(model(torch.tensor([tokens.encode(model, p)]))[0, -1].argmax()) for p in prompts]
    # the unedited model's own top-1 word as the true answer of half the prompts
    targets = [model.tokenizer.decode([t]).strip() if i % 2 == 0 else "Paris" for i, t in enumerate(tops)]
    drift = measure_drift(model, EIFFEL.rewrite, prompts, lambda: push_subject(model, EIFFEL.rewrite), targets)
    expected = [tokens.continuation_ids(model, p, t)[1][0] == top for p, t, top in zip(prompts, targets, tops)]
    assert drift.true_top1_before.tolist() == expected
    if type(model.original_model).__name__ == "GPT2LMHeadModel":
        assert expected[0], "GPT-2's top-1 word of the prompt is its true answer here"


def _sample(case_id, lp_before, lp_after, drift, group="distract_neighborhood"):
    """A prompt with (lp_true, lp_new) before / after the edit and every factor equal to ``drift``."""
    return DriftSample(case_id, group, f"p{case_id}-{drift}", "x", {f: drift for f in FACTORS}, *lp_before, *lp_after)


def _report(samples):
    """The report of hand-made samples, grouped into records by case_id (per-head values zero)."""
    records = []
    for case_id in dict.fromkeys(s.case_id for s in samples):
        mine = tuple(s for s in samples if s.case_id == case_id)
        zeros = torch.zeros(len(mine), 2, 2, dtype=torch.float64)
        records.append(RecordDrift(case_id, "counterfact", "S", "new", mine, zeros, zeros, zeros, zeros))
    return drift_report(records)


def test_failure_is_counted_on_prompts_right_before_the_edit():
    right, wrong, tie = (-1.0, -3.0), (-3.0, -1.0), (-2.0, -2.0)
    samples = [_sample(0, right, wrong, 0.9), _sample(0, right, right, 0.1), _sample(1, wrong, wrong, 0.8),
               _sample(1, tie, wrong, 0.7), _sample(2, wrong, right, 0.2), _sample(2, right, wrong, 0.6),
               _sample(3, right, right, 0.3), _sample(3, right, (-2.5, -2.0), 0.5)]
    assert [s.right_before for s in samples] == [True, True, False, True, False, True, True, True]
    assert [s.flipped for s in samples] == [True, False, False, True, False, True, False, True]
    assert samples[2].fails and not samples[2].flipped and math.isnan(samples[2].outcome("failure"))
    report = _report(samples)
    failure = report.failure()
    assert (failure["n_kept"], failure["n_failed"], failure["n_excluded_wrong_before"]) == (6, 4, 2)
    assert failure["rate"] == pytest.approx(4 / 6) and failure["n_prompts"] == 8
    assert (failure["n_records"], failure["n_records_kept"]) == (4, 4)
    half = 1.96 * math.sqrt(4 / 6 * 2 / 6 / 6)
    assert failure["ci95"] == pytest.approx([4 / 6 - half, min(1.0, 4 / 6 + half)])
    assert report.wrong_after_rate() == pytest.approx(5 / 8), "the old count includes the prompt wrong before"
    kept = [s for s in samples if s.right_before]
    factor = [s.factors["max_kl"] for s in kept]
    flipped = [float(s.flipped) for s in kept]
    c = report.correlations_right_before["all"]["max_kl"]
    assert c["failure"]["pearson"].r == pytest.approx(pearson(factor, flipped).r)
    assert c["failure"]["spearman"].r == pytest.approx(spearman(factor, flipped).r) and c["failure"]["pearson"].n == 6
    assert c["logodds_drop"]["pearson"].n == 6
    a = report.auroc_right_before["all"]["max_kl"]
    assert a == auroc_ci(factor, flipped, [s.case_id for s in kept]) and a.method == "cluster bootstrap"
    assert a.value == pytest.approx(auroc(factor, flipped)) and (a.n_pos, a.n_neg, a.n_clusters) == (4, 2, 4)
    assert sum(report.curves_right_before["max_kl"].count) == 6
    # the all-prompt statistics keep their meaning ("fails": wrong after the edit, every prompt)
    assert report.correlations["all"]["max_kl"]["fails"]["pearson"].n == 8
    assert report.auroc["all"]["max_kl"] == pytest.approx(auroc([s.factors["max_kl"] for s in samples],
                                                                [s.fails for s in samples]))
    headline = report.headline_right_before()["all"]
    assert tuple(headline) == HEADLINE_FACTORS and "max_kl" in HEADLINE_FACTORS
    assert headline["max_kl"]["n_prompts"] == 6 and headline["max_kl"]["n_records"] == 4
    assert headline["max_kl"]["auroc"]["ci_low"] <= headline["max_kl"]["auroc"]["value"]
    assert headline["max_kl"]["pearson_failure"]["method"] == "pearson"
    assert headline["max_kl"]["spearman_failure"]["method"] == "spearman"
    blob = json.loads(json.dumps(report.to_dict()))
    assert blob["failure"]["all"]["n_excluded_wrong_before"] == 2
    assert blob["failure_rate"] == blob["wrong_after_rate"] and blob["wrong_after_rate"]["all"] == pytest.approx(5 / 8)
    assert {"right_before", "failure", "wrong_after"} <= set(blob["definitions"])
    assert blob["records_by_group"] == {"distract_neighborhood": 4, "distract_relation": 0}
    assert blob["samples"][2]["right_before"] is False and blob["samples"][0]["true_top1_before"] is None
    assert DriftSample.from_dict(blob["samples"][0]) == samples[0]


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
        if rows.rows.shape[-1] > n:
            assert rows.rows[i, :, :, n:].abs().max() == 0
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
    with pytest.raises(RegionError, match="unknown region"):
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
    assert 0 <= report.wrong_after_rate() <= 1
    blob = json.loads(json.dumps(report.to_dict()))
    assert blob["n_samples"] == n_prompts and "distract_relation" in blob["correlations"]


def test_dataset_drift_rejects_unknown_groups(tiny_llama):
    with pytest.raises(DriftError, match="unknown groups"):
        dataset_drift(tiny_llama, RECORDS, lambda r: contextlib.nullcontext(), groups=("paraphrase",))
    with pytest.raises(DriftError, match="no record"):
        dataset_drift(tiny_llama, RECORDS[:1], lambda r: contextlib.nullcontext(), groups=("neighborhood",))


def _factory(model, edits=None):
    def factory(record):
        if edits is not None:
            edits.append(record.case_id)
        return push_subject(model, record.rewrite)
    return factory


def test_drift_record_line_round_trips_and_matches_measure_drift(tiny_llama):
    record = OBAMA
    result = drift_record(tiny_llama, record, _factory(tiny_llama))
    prompts, targets = _distract(record, "relation")
    assert [s.prompt for s in result.samples] == prompts and [s.target_true for s in result.samples] == targets
    drift = measure_drift(tiny_llama, record.rewrite, prompts, lambda: push_subject(tiny_llama, record.rewrite),
                          targets)
    before, after = drift.mass("subject_last")
    torch.testing.assert_close(result.subject_last_before, before.double(), atol=5e-7, rtol=0)
    torch.testing.assert_close(result.delta_subject_last, (after - before).double(), atol=1e-6, rtol=0)
    assert result.samples[0].factors["max_kl"] == pytest.approx(float(drift.factors()["max_kl"][0]), abs=1e-7)
    assert result.samples[1].lp_new_after == pytest.approx(float(drift.scores_after.lp_new[1]), abs=1e-6)
    line = json.loads(json.dumps(result.to_line()))
    assert set(line) == {"case_id", "kind", "subject", "target_new", "samples", "heads", "edit_seconds"}
    back = RecordDrift.from_line(line)
    for key in ("subject_last_before", "subject_last_after", "delta_subject", "kl"):
        assert torch.equal(getattr(back, key), getattr(result, key)), key
    assert back.samples == result.samples and back.to_line() == line
    assert result.top_heads(2) == back.top_heads(2) and result.top_heads(2)[0][0] == 1  # above the edited layer
    with pytest.raises(DriftError, match="no samples"):
        RecordDrift.from_line({"case_id": 1, "samples": [], "skipped": "no prompts"})


def test_drift_record_skips_records_without_prompts_without_editing(tiny_llama):
    edits = []
    assert drift_record(tiny_llama, EIFFEL, _factory(tiny_llama, edits), ("distract_relation",)) is None
    assert drift_record(tiny_llama, EIFFEL, _factory(tiny_llama, edits), ("neighborhood",)) is None
    assert edits == []
    with pytest.raises(DriftError, match="unknown groups"):
        drift_record(tiny_llama, EIFFEL, _factory(tiny_llama, edits), ("paraphrase",))


def test_capture_holds_the_full_patterns_of_the_same_passes(tiny_llama):
    record = EIFFEL
    heads = [(1, 2), (0, 1)]
    result = drift_record(tiny_llama, record, _factory(tiny_llama), capture_heads=heads)
    cap = result.capture
    assert cap.heads == tuple(heads) and cap.prompts == tuple(s.prompt for s in result.samples)
    for i, prompt in enumerate(cap.prompts):
        ids = tokens.encode(tiny_llama, prompt)
        n = len(ids)
        assert cap.tokens[i] == tuple(tokens.token_strings(tiny_llama, ids))
        assert cap.before[i].shape == (2, n, n) and cap.before[i].dtype == torch.float16
        with torch.no_grad():
            _, cache = tiny_llama.run_with_cache(torch.tensor([ids]), names_filter=lambda name: "pattern" in name)
        clean = cache["blocks.1.attn.hook_pattern"][0, 2]
        torch.testing.assert_close(cap.pattern(i, 1, 2, "before").float(), clean, atol=1e-3, rtol=0)
        with push_subject(tiny_llama, record.rewrite), torch.no_grad():
            _, cache = tiny_llama.run_with_cache(torch.tensor([ids]), names_filter=lambda name: "pattern" in name)
        torch.testing.assert_close(cap.pattern(i, 1, 2, "after").float(), cache["blocks.1.attn.hook_pattern"][0, 2],
                                   atol=1e-3, rtol=0)
        # the prediction row of the capture is the drift's row: its subject mass is subject_last_before
        s = Regions.of(tiny_llama, record.rewrite, prompt).subject[1]
        assert float(cap.pattern(i, 1, 2, "before")[n - 1, s]) == pytest.approx(
            float(result.subject_last_before[i, 1, 2]), abs=1e-3)
    assert torch.equal(cap.pattern(0, 0, 1, "before"), cap.pattern(0, 0, 1, "after"))  # below the edit
    assert "capture" not in result.to_line()
    line = json.loads(json.dumps(result.to_line(capture=True)))
    back = RecordDrift.from_line(line).capture
    assert back.heads == cap.heads and back.tokens == cap.tokens
    torch.testing.assert_close(back.after[1].float(), cap.after[1].float(), atol=3e-4, rtol=0)  # 4 digits, float16
    picked = cap.select([(0, 1)])
    assert picked.heads == ((0, 1),) and torch.equal(picked.before[0][0], cap.before[0][1])
    with pytest.raises(DriftError, match="not captured"):
        cap.pattern(0, 1, 1)
    with pytest.raises(DriftError, match="not captured"):
        cap.select([(1, 1)])


def test_capture_top_k_and_all_heads(tiny_llama):
    top = drift_record(tiny_llama, EIFFEL, _factory(tiny_llama), capture_heads=3)
    assert list(top.capture.heads) == [(l, h) for l, h, _ in top.top_heads(3)]
    every = drift_record(tiny_llama, EIFFEL, _factory(tiny_llama), capture_heads="all")
    assert len(every.capture.heads) == tiny_llama.cfg.n_layers * tiny_llama.cfg.n_heads
    assert torch.equal(every.capture.select(list(top.capture.heads)).after[2], top.capture.after[2])
    assert json.dumps([s.to_dict() for s in every.samples]) == json.dumps([s.to_dict() for s in top.samples])
    with pytest.raises(DriftError, match="out of range"):
        drift_record(tiny_llama, EIFFEL, _factory(tiny_llama), capture_heads=[(2, 0)])
    with pytest.raises(DriftError, match="capture_heads must be"):
        drift_record(tiny_llama, EIFFEL, _factory(tiny_llama), capture_heads="some")
    assert isinstance(every.capture, HeadCapture)


def test_dataset_drift_is_the_report_of_the_run_lines(tiny_llama):
    """dataset_drift (notebooks) and drift_from_lines over run-file lines (the command) agree exactly."""
    records = RECORDS[:4]
    report = dataset_drift(tiny_llama, records, _factory(tiny_llama))
    lines = [json.loads(json.dumps(drift_record(tiny_llama, r, _factory(tiny_llama)).to_line())) for r in records]
    from_lines = drift_from_lines(lines, top_k=10)
    assert json.dumps(report.to_dict(10)) == json.dumps(from_lines)
    assert json.dumps(drift_report([RecordDrift.from_line(x) for x in lines]).to_dict(3)) == \
        json.dumps(drift_from_lines(lines, top_k=3))
    with pytest.raises(DriftError, match="nothing to report"):
        drift_report([])


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


def test_drift_of_a_sadr_edit_records_what_sadr_selected(tiny_llama):
    """The line of a SADR edit says, per head, how often SADR selected it (the explorer's dots)."""
    from attention_drift.core.data import load_example
    from attention_drift.editing import edit
    from attention_drift.editing.sadr import SADRConfig

    record = next(r for r in load_example() if r.kind == "counterfact")
    sadr = SADRConfig(weight=1.0, steps=4, selection="all")
    result = drift_record(tiny_llama, record, lambda r: edit(tiny_llama, r.rewrite, "rome", sadr=sadr))
    selected = result.sadr_selected
    assert selected.shape == (tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert float(selected.max()) == 1.0 and float(selected.min()) >= 0.0  # "all": every regularised head, always
    assert RecordDrift.from_line(result.to_line()).sadr_selected.tolist() == selected.tolist()
    plain = drift_record(tiny_llama, record, lambda r: edit(tiny_llama, r.rewrite, "rome"))
    assert plain.sadr_selected is None and "sadr_selected" not in plain.to_line()


def test_reports_are_typed_and_give_their_json_and_markdown():
    """DriftReport and PatchReport carry their JSON (the committed file's content) and markdown."""
    from synthetic_drift import synthetic_run

    from attention_drift.reports.drift import drift_markdown
    from attention_drift.reports.patch import PatchReport

    lines, _ = synthetic_run(n_records=4, prompts_per_record=(2, 3), seed=1)
    records = [RecordDrift.from_line(x) for x in lines[1:]]
    report = drift_report(records)
    assert report.markdown("t") == drift_markdown(drift_from_lines(lines[1:]), "t")
    content = {"records": 1, "n_prompts": 2, "n_prompts_by_group": {}, "records_by_group": {}, "pre": {}, "post": {},
               "variants": {}, "top_heads": {}, "sweep": {"n_prompts": 2}, "markdown": "dropped"}
    patch = PatchReport.from_dict(content)
    assert list(patch.to_dict()) == [k for k in content if k != "markdown"]
    assert patch.to_dict()["sweep"] == {"n_prompts": 2} and patch.topk_vs_random is None
