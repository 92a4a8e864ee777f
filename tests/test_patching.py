import contextlib
import json

import pytest
import torch

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite, load_example
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight
from attention_drift.measure.patching import (
    Patch,
    PatchCase,
    PatchingError,
    aggregate,
    layer_component_grid,
    layer_head_grid,
    layer_position_grid,
    patch_edit,
    patch_states,
    record_activations,
    run_patched,
    run_variant,
    supports_pattern_patching,
    window_grid,
)
from attention_drift.measure.patch_record import (
    CONTAMINATION_COMPONENTS,
    SUMMARY_VARIANTS,
    SWEEP_COMPONENTS,
    RANDOM_DRAWS,
    key_positions,
    random_variant_names,
    matched_random_heads,
    patch_record,
    summary_variants,
    topk_variant,
)

from handmade_edit import push_subject  # noqa: E402

RECORDS = load_example()
EIFFEL = RECORDS[0]
OBAMA = RECORDS[3]
ALL = ("attn_out", "mlp_out")


def _case(record=EIFFEL, group="neighborhood", i=0) -> PatchCase:
    prompts = getattr(record, group)
    return PatchCase.distract(record.rewrite, prompts.prompts[i], prompts.targets[i])


def _everything(model):
    layers = tuple(range(model.cfg.n_layers))
    return tuple(Patch(c, layers) for c in ALL)


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("record,group", [(EIFFEL, "neighborhood"), (OBAMA, "relation")])
def test_patch_everything_is_clean_and_nothing_is_edited(model, record, group):
    case = _case(record, group)
    clean = record_activations(model, case, [_everything(model)])
    with torch.no_grad():
        clean_logits = model(clean.batch.input_ids, attention_mask=clean.batch.attention_mask)
    with push_subject(model, record.rewrite):
        with torch.no_grad():
            edited_logits = model(clean.batch.input_ids, attention_mask=clean.batch.attention_mask)
        assert not torch.allclose(edited_logits, clean_logits, atol=1e-4)
        everything, _ = run_variant(model, clean, _everything(model))
        nothing, _ = run_variant(model, clean, ())
        result = run_patched(model, clean, [(), _everything(model)])
    torch.testing.assert_close(everything, clean_logits, atol=1e-5, rtol=0)
    assert torch.equal(nothing, edited_logits)
    assert result.metric("recovery")[1].item() == pytest.approx(1.0, abs=1e-3)
    assert result.metric("recovery")[0].item() == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(result.patched.lp_true[1], clean.scores.lp_true[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(result.patched.lp_true[0], result.base.lp_true[0], atol=1e-5, rtol=0)


def test_two_row_layout_for_multi_token_targets(tiny_llama):
    prompt = "The Louvre is in"
    multi = record_activations(tiny_llama, PatchCase(prompt, "United States of America", "Canada"))
    assert len(multi.batch) == 2 and multi.target_ids is None
    single = record_activations(tiny_llama, PatchCase(prompt, "Paris", "Rome"))
    assert len(single.batch) == 1 and single.target_ids is not None  # both in the tiny vocabulary
    for source, targets in ((multi, ["United States of America", "Canada"]), (single, ["Paris", "Rome"])):
        batch = tokens.batch_with_targets(tiny_llama, [prompt] * 2, targets)
        with torch.no_grad():
            lp = tokens.target_log_probs(tiny_llama(batch.input_ids, attention_mask=batch.attention_mask), batch)
        torch.testing.assert_close(source.scores.lp_true[0], lp[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(source.scores.lp_new[0], lp[1], atol=1e-5, rtol=0)
    with pytest.raises(PatchingError, match="tokenise identically"):
        record_activations(tiny_llama, PatchCase(prompt, "Paris", " Paris "))


def test_single_head_pattern_patch_changes_only_that_head(model):
    case = _case()
    clean = record_activations(model, case, [Patch("pattern", 1)])
    z = "blocks.1.attn.hook_z"
    with push_subject(model, EIFFEL.rewrite):
        _, plain = run_variant(model, clean, (), names_filter=lambda n: n in (z, "blocks.1.attn.hook_pattern"))
        _, patched = run_variant(model, clean, Patch("pattern", 1, heads=2, positions=-1),
                                 names_filter=lambda n: n in (z, "blocks.1.attn.hook_pattern"))
    last = int(clean.batch.last_prompt_index[0])
    others = [h for h in range(model.cfg.n_heads) if h != 2]
    assert torch.equal(patched[z][:, :, others], plain[z][:, :, others])  # incl. the GQA partner of head 2
    assert torch.equal(patched[z][:, :last, 2], plain[z][:, :last, 2])     # other query positions untouched
    assert not torch.allclose(patched[z][:, last, 2], plain[z][:, last, 2])
    torch.testing.assert_close(patched["blocks.1.attn.hook_pattern"][:, 2, last],
                               clean.cache["blocks.1.attn.hook_pattern"][:, 2, last])


def test_batched_sweep_equals_per_variant_runs(model):
    case = _case(OBAMA, "relation")
    grid = layer_head_grid(model, "pattern")
    mixed = list(grid.variants) + [(), (Patch("z", 1, heads=(0, 3), positions="subject"), Patch("mlp_out", 0))]
    clean = record_activations(model, case, mixed)
    with push_subject(model, OBAMA.rewrite):
        batched = run_patched(model, clean, mixed, batch_size=64)
        small = run_patched(model, clean, mixed, batch_size=3)
        single = [run_patched(model, clean, [v], batch_size=1) for v in mixed]
        gridded = run_patched(model, clean, grid)
    lp = torch.cat([s.patched.lp_true for s in single])
    torch.testing.assert_close(batched.patched.lp_true, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(small.patched.lp_new, torch.cat([s.patched.lp_new for s in single]), atol=1e-5, rtol=0)
    assert gridded.values("p_true").shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(gridded.values("lp_true").flatten(), lp[: len(grid.variants)], atol=1e-5, rtol=0)
    # layer 0 attention comes before the edited MLP: restoring it changes nothing.
    assert gridded.values("delta_logodds")[0].abs().max() < 1e-5


@pytest.mark.parametrize("true,new", [(None, None), ("United States of America", "Canada")])
def test_run_patched_equals_a_full_forward_pass_per_variant(model, true, new):
    """run_patched's shortcuts (start at the first changed layer, join batches there, unembed the
    read positions only) give the scores of a plain hooked forward pass per variant, in both the
    one-row and the two-row (multi-token targets) layouts."""
    case = _case()
    if true is not None:
        case = PatchCase(case.prompt, true, new, case.rewrite)
    last = model.cfg.n_layers - 1
    variants = [(), (Patch("pattern", 0),), (Patch("pattern", last, heads=1),), (Patch("z", 0, heads=(0, 3)),),
                (Patch("resid_pre", last, positions=-1),), (Patch("resid_post", 0, positions="subject_last"),),
                (Patch("mlp_out", 0), Patch("pattern", last, heads=2)), (Patch("attn_out", (0, last)),),
                (Patch("mlp_post", 0, positions=(2, 3)),)]
    clean = record_activations(model, case, variants)
    assert (clean.target_ids is None) == (true is not None)
    with push_subject(model, EIFFEL.rewrite):
        result = run_patched(model, clean, variants, batch_size=3)
        plain = [clean.score(run_variant(model, clean, v)[0]) for v in variants]
        unpatched = clean.score(run_variant(model, clean, ())[0])
    torch.testing.assert_close(result.patched.lp_true, torch.cat([s.lp_true for s in plain]), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.patched.lp_new, torch.cat([s.lp_new for s in plain]), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.base.lp_true, unpatched.lp_true, atol=1e-6, rtol=0)
    assert float((result.patched.lp_true - result.base.lp_true).abs().max()) > 1e-3  # the patches do something


def test_run_patched_runs_each_variant_from_its_first_changed_layer(tiny_llama):
    """Below the layer where a variant first writes a value the unpatched run lacks, nothing is
    run for it: a variant restoring layer 0's attention (before the edited MLP) or nothing runs
    no block; variants join their batch at their own layer."""
    model = tiny_llama
    case = _case()
    variants = [(Patch("mlp_out", 1),), (), (Patch("pattern", 0),), (Patch("resid_post", 0, positions=-1),)]
    clean = record_activations(model, case, variants)
    rows: dict[int, list[int]] = {layer: [] for layer in range(model.cfg.n_layers)}

    def count(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows[layer].append(hidden.shape[0])
        return hook

    assert supports_pattern_patching(model)  # probed (two forward passes) before counting
    with push_subject(model, EIFFEL.rewrite):  # edits layer 0's MLP
        handles = [model.blocks[l].register_forward_pre_hook(count(l), with_kwargs=True) for l in rows]
        try:
            result = run_patched(model, clean, variants, batch_size=64)
        finally:
            for handle in handles:
                handle.remove()
    # the unpatched reference pass (1 row per block), then one batch: resid_post 0 from layer 0, mlp_out 1 joining at 1
    assert rows == {0: [1, 1], 1: [1, 2]}
    assert result.patched.pair(1) == result.base.pair() and result.patched.pair(2) == result.base.pair()
    assert result.patched.pair(0) != result.base.pair()


def test_contamination_reverses_roles(model):
    case = _case()
    edit = lambda: push_subject(model, EIFFEL.rewrite)  # noqa: E731
    restore = patch_edit(model, [case], edit, [(), _everything(model)])[0]
    contaminate = patch_edit(model, [case], edit, [(), _everything(model)], direction="contaminate")[0]
    torch.testing.assert_close(contaminate.base.lp_true, restore.source.lp_true)
    torch.testing.assert_close(contaminate.source.lp_true, restore.base.lp_true)
    torch.testing.assert_close(contaminate.patched.lp_true[1], restore.base.lp_true[0], atol=1e-5, rtol=0)
    assert contaminate.metric("recovery")[1].item() == pytest.approx(1.0, abs=1e-3)
    assert contaminate.metric("delta_p_true")[0].item() == pytest.approx(0.0, abs=1e-6)


def test_patch_states_between_two_edits(model):
    """Source and base both edited (a weak and a strong edit of one fact, layer 0): nothing patched
    is the strong edit's run, everything patched and layer 0's MLP output alone (the only weights
    that differ) each give the weak edit's run, and each state is entered once."""
    case = _case()
    entered = []

    def state(scale):
        @contextlib.contextmanager
        def fn():
            entered.append(scale)
            with push_subject(model, EIFFEL.rewrite, scale=scale):
                yield
        return fn

    variants = [(), _everything(model), (Patch("mlp_out", 0),), (Patch("pattern", tuple(range(model.cfg.n_layers))),)]
    result = patch_states(model, [case], state(5.0), state(20.0), variants)[0]
    assert entered == [5.0, 20.0]
    with push_subject(model, EIFFEL.rewrite, scale=5.0):
        weak = record_activations(model, case, variants)
    with push_subject(model, EIFFEL.rewrite, scale=20.0):
        strong = record_activations(model, case, variants)
    torch.testing.assert_close(result.source.lp_true, weak.scores.lp_true)
    torch.testing.assert_close(result.base.lp_true, strong.scores.lp_true)
    assert result.base.logodds.item() != pytest.approx(result.source.logodds.item(), abs=1e-3)
    torch.testing.assert_close(result.patched.lp_true[0], strong.scores.lp_true[0])
    for v in (1, 2):
        assert result.metric("recovery")[v].item() == pytest.approx(1.0, abs=1e-3)
    # the unedited model on one side is patch_edit's restoration
    restored = patch_edit(model, [case], state(20.0), variants)[0]
    one_sided = patch_states(model, [case], None, state(20.0), variants)[0]
    torch.testing.assert_close(restored.patched.lp_true, one_sided.patched.lp_true)
    with pytest.raises(PatchingError, match="at least one case"):
        patch_states(model, [], None, state(20.0), variants)


def test_patch_edit_many_cases_and_aggregate(tiny_llama):
    cases = PatchCase.from_record(EIFFEL)
    assert len(cases) == len(EIFFEL.neighborhood)
    entered = []

    @contextlib.contextmanager
    def edit():
        entered.append(1)
        with push_subject(tiny_llama, EIFFEL.rewrite):
            yield

    grid = window_grid(tiny_llama, "pattern", window=2)
    results = patch_edit(tiny_llama, cases, edit, grid)
    assert len(entered) == 1 and len(results) == len(cases)
    mean, sem = aggregate(results, "delta_logodds")
    stacked = torch.stack([r.values("delta_logodds") for r in results])
    torch.testing.assert_close(mean, stacked.mean(0))
    torch.testing.assert_close(sem, stacked.std(0) / len(cases) ** 0.5)
    with pytest.raises(PatchingError, match="identical variants"):
        aggregate([results[0], patch_edit(tiny_llama, cases[:1], edit, [()])[0]])


def test_grids(tiny_llama):
    grid = layer_component_grid(tiny_llama, ("attn_out", "mlp_out", "resid_pre"), positions=-1)
    assert grid.shape == (2, 3) and grid.axes == ("layer", "component")
    assert grid.variants[5] == (Patch("resid_pre", (1,), None, (-1,)),)

    class Cfg:
        n_layers, n_heads = 30, 9

    class Fake:
        cfg = Cfg

    windows = window_grid(Fake, window=10)
    assert windows.shape == (30,)
    assert windows.variants[0][0].layers == tuple(range(0, 5))
    assert windows.variants[15][0].layers == tuple(range(10, 20))
    assert windows.variants[29][0].layers == tuple(range(24, 30))
    assert windows.labels[0][15] == "10-19"
    contamination = layer_position_grid(Fake, positions=[3, -1], component="attn_out", window=6)
    assert contamination.shape == (2, 30)
    assert contamination.variants[30 + 10][0] == Patch("attn_out", tuple(range(7, 13)), None, (-1,))
    assert layer_head_grid(Fake, "z").shape == (30, 9)


def test_bad_specs_raise_before_the_edit(tiny_llama):
    calls = []

    def edit():
        calls.append(1)
        return contextlib.nullcontext()

    case = _case()
    with pytest.raises(PatchingError, match="unknown component"):
        Patch("q", 0)
    with pytest.raises(PatchingError, match="resid_mid"):
        Patch("resid_mid", 0)
    with pytest.raises(PatchingError, match="heads only apply"):
        Patch("mlp_out", 0, heads=1)
    with pytest.raises(PatchingError, match="unknown region"):
        Patch("z", 0, positions="verb")
    for variants, message in [
        ([Patch("mlp_out", 5)], "out of range"),
        ([Patch("z", 0, heads=7)], "out of range"),
        ([Patch("z", 0, positions=(99,))], "outside"),
        ([Patch("z", 0, positions="prompt_subject")], "no 'prompt_subject' region"),
        ([], "no variants"),
    ]:
        with pytest.raises(PatchingError, match=message):
            patch_edit(tiny_llama, [case], edit, variants)
    with pytest.raises(PatchingError, match="needs the case's rewrite"):
        patch_edit(tiny_llama, [PatchCase(case.prompt, case.true_target, case.new_target)], edit,
                   [Patch("z", 0, positions="subject")])
    with pytest.raises(PatchingError, match="direction"):
        patch_edit(tiny_llama, [case], edit, [()], direction="sideways")
    assert not calls


def test_region_positions(tiny_gpt2):
    case = _case(OBAMA, "relation")
    from attention_drift.measure.drift import Regions

    regions = Regions.of(tiny_gpt2, OBAMA.rewrite, case.prompt)
    clean = record_activations(tiny_gpt2, case, [Patch("resid_pre", 1)])
    with push_subject(tiny_gpt2, OBAMA.rewrite):
        named = run_patched(tiny_gpt2, clean, [Patch("resid_pre", 1, positions="subject_last")])
        explicit = run_patched(tiny_gpt2, clean, [Patch("resid_pre", 1, positions=regions.subject[1])])
    assert torch.equal(named.patched.lp_true, explicit.patched.lp_true)


def test_pattern_probe(tiny_llama, tiny_gpt2):
    assert supports_pattern_patching(tiny_llama) and supports_pattern_patching(tiny_gpt2)


@pytest.fixture
def tiny_gpt_neo(tmp_path):
    """A random 2-layer GPT-Neo: TransformerLens 4.3 lets HF compute its attention."""
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    from attention_drift.core.models import _tiny_tokenizer, load_model

    tokenizer = _tiny_tokenizer()
    config = GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=256, window_size=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["GPTNeoForCausalLM"]
    folder = tmp_path / "tiny_gpt_neo"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder)


def test_pattern_patching_refused_where_edits_are_discarded(tiny_gpt_neo):
    calls = []

    def edit():
        calls.append(1)
        return contextlib.nullcontext()

    assert not supports_pattern_patching(tiny_gpt_neo)
    with pytest.raises(PatchingError, match="pattern patching is not possible.*gpt_neo"):
        patch_edit(tiny_gpt_neo, [_case()], edit, layer_head_grid(tiny_gpt_neo))
    assert not calls
    source = record_activations(tiny_gpt_neo, _case(), [Patch("z", 1)])
    with pytest.raises(PatchingError, match="pattern patching"):
        run_patched(tiny_gpt_neo, source, [Patch("pattern", 1)])
    # other components still work there
    result = run_patched(tiny_gpt_neo, source, [Patch("z", 1, heads=0)])
    assert torch.isfinite(result.patched.lp_true).all()


class Edits:
    """The hand-made edit as a record factory that counts how often it is entered."""

    def __init__(self, model):
        self.model, self.entered = model, []

    def __call__(self, record):
        self.entered.append(record.case_id)
        return push_subject(self.model, record.rewrite)


def test_patch_record_matches_the_primitives(model):
    """Each number of patch_record is what record_activations / run_patched give on their own."""
    edits = Edits(model)
    result = patch_record(model, EIFFEL, edits, k=2, sweep_prompts=1, contamination_prompts=1, window=2,
                          contamination_window=2)
    assert edits.entered == [EIFFEL.case_id]  # entered once for restoration, sweeps and contamination
    cases = PatchCase.from_record(EIFFEL, ("neighborhood",))
    assert [c.prompt for c in result.cases] == [c.prompt for c in cases]
    top = [(l, h) for l, h, _ in result.top_heads]
    assert len(top) == 2 and result.head_source == "record"
    named = summary_variants(model, top)
    assert list(result.cases[0].variants) == list(named) + random_variant_names(RANDOM_DRAWS)
    assert list(named) == list(SUMMARY_VARIANTS)
    clean = record_activations(model, cases[1], None)
    with push_subject(model, EIFFEL.rewrite):
        alone = run_patched(model, clean, list(named.values()))
        edited = record_activations(model, cases[0], None)
    case = result.cases[1]
    assert case.pre == pytest.approx(alone.source.pair(), abs=1e-5)
    assert case.post == pytest.approx(alone.base.pair(), abs=1e-5)
    for j, name in enumerate(named):
        assert case.variants[name] == pytest.approx(alone.patched.pair(j), abs=1e-5), name
    assert case.recovery("mlp_out_all") == pytest.approx(1.0, abs=1e-3)  # the edit is in an MLP weight
    assert case.recovery("none") == pytest.approx(0.0, abs=1e-6)
    # top heads: ranked by this record's mean drift of the last token's attention to the subject's last token
    drift = []
    for c in cases:
        subject_last = key_positions(model, c)["subject_last"]
        before = record_activations(model, c, [Patch("pattern", 1)])
        with push_subject(model, EIFFEL.rewrite):
            after = record_activations(model, c, [Patch("pattern", 1)])
        q = int(before.batch.prompt_lengths[0]) - 1
        name = "blocks.1.attn.hook_pattern"
        drift.append(after.cache[name][0, :, q, subject_last] - before.cache[name][0, :, q, subject_last])
    mean = torch.stack(drift).mean(0)
    assert [h for l, h, _ in result.top_heads] == mean.argsort(descending=True)[:2].tolist()
    assert all(l == 1 for l, _, _ in result.top_heads)
    # sweep: the first prompt only; restoring layer 0's MLP output undoes the whole edit
    (sweep,) = result.sweeps
    rec, windows = sweep.recovery()
    assert rec.shape == (model.cfg.n_layers, len(SWEEP_COMPONENTS)) and windows.shape == (model.cfg.n_layers,)
    assert float(rec[0, SWEEP_COMPONENTS.index("mlp_out")]) == pytest.approx(1.0, abs=1e-3)
    assert sweep.window_labels == window_grid(model, "pattern", 2).labels[0]
    # contamination: the unedited model (pre) with the edited model's (post) outputs substituted
    (cont,) = result.contamination
    assert cont.labels == ("subject_last", "target_new_last", "last") and cont.tokens[0].strip() == "Tower"
    assert set(cont.components) == set(CONTAMINATION_COMPONENTS)
    assert cont.pre == pytest.approx(result.cases[0].pre, abs=1e-6)
    assert cont.post == pytest.approx(result.cases[0].post, abs=1e-6)
    lp_true = cont.components["mlp_out"][0]
    assert lp_true.shape == (3, model.cfg.n_layers)
    assert edited.scores.lp_true[0].item() == pytest.approx(cont.post[0], abs=1e-5)
    assert cont.p_true_drop("attn_out").shape == (3, model.cfg.n_layers)
    damage = cont.damage("mlp_out")
    lo = lp_true - cont.components["mlp_out"][1]
    expected = (lo - (cont.pre[0] - cont.pre[1])) / ((cont.post[0] - cont.post[1]) - (cont.pre[0] - cont.pre[1]))
    torch.testing.assert_close(damage, expected)
    line = json.loads(json.dumps(result.to_line()))
    assert set(line) == {"case_id", "kind", "subject", "target_new", "cases", "sweeps", "contamination",
                         "edit_seconds", "head_source", "top_heads", "random_heads"}


def test_patch_record_extra_variants_given_heads_and_own_cases(tiny_llama):
    edits = Edits(tiny_llama)
    seen = []

    def extra(ranking):
        seen.append(list(ranking))
        return {"first head": Patch("pattern", ranking[0][0], ranking[0][1]), "mlp 0": Patch("mlp_out", 0)}

    cases = [PatchCase.distract(EIFFEL.rewrite, "The Louvre is in", "Paris")]
    result = patch_record(tiny_llama, EIFFEL, edits, k=1, heads=[(1, 3), (0, 2)], variants=extra, cases=cases,
                          sweep_prompts=0, contamination_prompts=0)
    assert seen == [[(1, 3), (0, 2)]] and result.head_source == "given"
    assert [t[:2] for t in result.top_heads] == [(1, 3)]
    (case,) = result.cases
    assert case.prompt == cases[0].prompt and list(case.variants)[-2:] == ["first head", "mlp 0"]
    assert case.variants["mlp 0"] == pytest.approx(case.pre, abs=1e-5)  # the edit is in layer 0's MLP
    assert case.variants["first head"] == pytest.approx(case.variants["attn_pattern_topk"], abs=1e-6)
    assert result.sweeps == () and result.contamination == ()
    seen.clear()
    ranked = patch_record(tiny_llama, EIFFEL, edits, k=2, variants=extra, sweep_prompts=0, contamination_prompts=0)
    (ranking,) = seen  # without heads: every head, most drifting first
    assert len(ranking) == tiny_llama.cfg.n_layers * tiny_llama.cfg.n_heads
    assert ranking[:2] == [(l, h) for l, h, _ in ranked.top_heads]
    assert [d for _, _, d in ranked.top_heads] == sorted((d for _, _, d in ranked.top_heads), reverse=True)
    with pytest.raises(PatchingError, match="reuse names"):
        patch_record(tiny_llama, EIFFEL, edits, variants={"none": ()}, sweep_prompts=0, contamination_prompts=0)


def test_patch_record_bad_input_fails_before_editing(tiny_llama):
    edits = Edits(tiny_llama)
    for options, message in [({"k": 0}, "k must be"), ({"contamination_positions": "some"}, "'key' or 'all'"),
                             ({"window": 0}, "window must be"), ({"sweep_prompts": -1}, ">= 0"),
                             ({"cases": [PatchCase("The Louvre is in", "Paris", "Rome")]}, "needs its rewrite")]:
        with pytest.raises(PatchingError, match=message):
            patch_record(tiny_llama, EIFFEL, edits, **options)
    assert patch_record(tiny_llama, OBAMA, edits, groups=("neighborhood",)) is None  # no neighbourhood prompts
    assert edits.entered == []
    relation = patch_record(tiny_llama, OBAMA, edits, sweep_prompts=0, contamination_prompts=0, random_draws=0)
    assert {c.group for c in relation.cases} == {"distract_relation"}
    assert len(relation.cases) == len(OBAMA.relation.prompts)
    assert topk_variant([]) == () and "attn_pattern_topk" not in summary_variants(tiny_llama, [])


def test_matched_random_heads_keep_the_layers_and_avoid_the_top_heads():
    import numpy as np

    top = [(3, 1), (3, 4), (5, 0)]
    rng = np.random.default_rng(0)
    draws = [matched_random_heads(top, 6, 5, rng) for _ in range(400)]
    for draw in draws:
        assert [l for l, _ in draw] == [3, 3, 5] and not set(draw) & set(top) and len(set(draw)) == 3
    assert {h for d in draws for l, h in d if l == 3} == {0, 2, 3}  # uniform over the layer's other heads
    assert {h for d in draws for l, h in d if l == 5} == {1, 2, 3, 4}
    assert matched_random_heads(top, 6, 5, np.random.default_rng(7)) == \
        matched_random_heads(top, 6, 5, np.random.default_rng(7))
    # a layer whose heads are nearly all top heads: the shortfall comes from the other layers
    full = [(1, 0), (1, 1), (1, 2)]
    for _ in range(20):
        draw = matched_random_heads(full, 2, 4, rng)
        assert (1, 3) in draw and len(draw) == 3 and not set(draw) & set(full)
        assert sum(l == 0 for l, _ in draw) == 2
    with pytest.raises(PatchingError, match="too few"):
        matched_random_heads([(0, 0), (0, 1), (1, 0)], 2, 2, rng)


def test_patch_record_random_heads_control(tiny_llama):
    edits = Edits(tiny_llama)
    options = dict(sweep_prompts=0, contamination_prompts=0)
    result = patch_record(tiny_llama, EIFFEL, edits, k=2, random_draws=3, **options)
    top = sorted((l, h) for l, h, _ in result.top_heads)
    assert len(result.random_heads) == 3
    for draw in result.random_heads:
        assert sorted(l for l, _ in draw) == sorted(l for l, _ in top) and not set(draw) & set(top)
    again = patch_record(tiny_llama, EIFFEL, edits, k=2, random_draws=3, **options)
    assert again.random_heads == result.random_heads, "the draws are seeded by random_seed and the case id"
    seeds = [patch_record(tiny_llama, EIFFEL, edits, k=1, random_draws=6, random_seed=seed, **options).random_heads
             for seed in (0, 5)]
    assert seeds[0] != seeds[1] and len({d for draws in seeds for d in draws}) == 3  # the layer's 3 other heads
    # each control variant patches exactly its drawn heads: the same as giving them as the top heads
    draw = list(result.random_heads[1])
    given = patch_record(tiny_llama, EIFFEL, edits, k=2, heads=draw, random_draws=0, **options)
    for case, alone in zip(result.cases, given.cases):
        assert case.variants["attn_pattern_random/1"] == pytest.approx(alone.variants["attn_pattern_topk"], abs=1e-6)
        assert not any(n.startswith("attn_pattern_random") for n in alone.variants)
    line = json.loads(json.dumps(result.to_line()))
    assert line["random_heads"] == [[list(h) for h in d] for d in result.random_heads]
    with pytest.raises(PatchingError, match="random_draws"):
        patch_record(tiny_llama, EIFFEL, edits, random_draws=-1, **options)
    with pytest.raises(PatchingError, match="reuse names"):
        patch_record(tiny_llama, EIFFEL, edits, k=1, variants={"attn_pattern_random/0": ()}, **options)
    # every head a top head: no control of the same size exists, none is run
    crowded = patch_record(tiny_llama, EIFFEL, edits, k=8, **options)
    assert crowded.random_heads == () and "attn_pattern_random/0" not in crowded.cases[0].variants


@contextlib.contextmanager
def learned_edit(model, rewrite: Rewrite, layer: int = 5, steps: int = 10, lr: float = 0.5):
    """A ROME-like edit without covariance or KL terms: optimise the MLP output added at the
    subject's last token of ``layer`` until the rewrite prompt predicts target_new, then write it
    into W_out as a rank-one update along the subject's key (restored on exit)."""
    name_out, name_key = f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_post"
    batch = tokens.batch_with_targets(model, [rewrite.prompt], [rewrite.target_new])
    last = tokens.subject_span(model, rewrite.prompt, rewrite.subject)[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.input_ids, names_filter=lambda n: n == name_key)
    key = cache[name_key][0, last]
    delta = torch.zeros(model.cfg.d_model, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)

    def add(act, hook):
        act = act.clone()
        act[:, last] = act[:, last] + delta
        return act

    for _ in range(steps):
        optimiser.zero_grad()
        logits = model.run_with_hooks(batch.input_ids, fwd_hooks=[(name_out, add)])
        (-tokens.target_log_probs(logits, batch).mean()).backward()
        optimiser.step()
    weight = mlp_out_weight(model, layer)
    update = torch.outer(delta.detach(), key) / (key @ key)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += update.T if mlp_out_is_conv1d(model) else update
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.slow
def test_smollm2_pattern_restoration_recovers_true_answer(smollm2):
    """The paper's RQ4 on one distract prompt: after an edit Eiffel Tower -> Rome at layer 5,
    "The Eiffel Tower is located in Rome. The Arc de Triomphe is located in" loses " Paris";
    restoring the pre-edit attention patterns of all layers brings most of P(true) back."""
    record = EIFFEL
    case = PatchCase.distract(record.rewrite, record.neighborhood.prompts[2], record.neighborhood.targets[2])
    layers = tuple(range(smollm2.cfg.n_layers))
    variants = [(), Patch("pattern", layers), Patch("pattern", layers[:6])]
    weight = mlp_out_weight(smollm2, 5).detach().clone()
    result = patch_edit(smollm2, [case], lambda: learned_edit(smollm2, record.rewrite), variants)[0]
    assert torch.equal(mlp_out_weight(smollm2, 5), weight)
    p_clean, p_edited = result.source.p_true.item(), result.base.p_true.item()
    p_patched = result.patched.p_true.tolist()
    assert p_edited < 0.5 * p_clean, (p_clean, p_edited)  # the edit makes the distract prompt fail
    assert result.metric("recovery_p")[1].item() > 0.5, (p_clean, p_edited, p_patched)
    assert result.metric("recovery")[1].item() > 0.4, (p_clean, p_edited, p_patched)
    # patching nothing, or layers 0-5 whose attention runs before the edited MLP, changes nothing
    assert p_patched[0] == pytest.approx(p_edited, rel=1e-4)
    assert p_patched[2] == pytest.approx(p_edited, rel=1e-4)


@pytest.mark.slow
def test_smollm2_rome_pattern_restoration(smollm2):
    """The same with a ROME edit (no covariance, two short context templates, to stay quick)."""
    from attention_drift.editing import ROMEConfig, edit

    rewrite = EIFFEL.rewrite
    config = ROMEConfig(layer=5, clamp_norm_factor=2.0, mom2_adjustment=False, context_templates=((5, 2),))
    cases = PatchCase.from_record(EIFFEL)
    layers = tuple(range(smollm2.cfg.n_layers))
    results = patch_edit(smollm2, cases, lambda: edit(smollm2, rewrite, method="rome", config=config),
                         [(), Patch("pattern", layers)])
    failing = [r for r in results if r.base.p_true.item() < 0.25 * r.source.p_true.item()]
    assert failing, [(r.source.p_true.item(), r.base.p_true.item()) for r in results]
    for r in failing:
        assert r.metric("recovery")[1].item() > 0.5, (r.case.prompt, r.patched.p_true.tolist())
