"""The case study: one edit, one distract prompt, attention before / after, pattern restoration."""

import contextlib
import dataclasses
import json

import plotly.graph_objects as go
import pytest
import torch

from attention_drift.core import tokens
from attention_drift.measure.case_study import (
    CaseStudy,
    CaseStudyError,
    STATES,
    HeadChange,
    case_study,
)
from attention_drift.views.case_study import STATE_LABELS, TITLE_CHARS, case_study_figure, case_study_view
from attention_drift.views.plots import token_label
from attention_drift.core.data import Rewrite, distract_prompt
from attention_drift.editing import ROMEConfig, StatsConfig
from attention_drift.views.viz import AttentionView

from handmade_edit import push_subject  # noqa: E402

EIFFEL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
PROMPT = distract_prompt(EIFFEL, "The Louvre is in")


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, saved) -> bool:
    return all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


@contextlib.contextmanager
def sharpen_queries(model, factor: float = 4.0):
    """An attention-only edit: scale every layer's query projection (patterns change, nothing else)."""
    hf = model.original_model
    if hasattr(hf, "transformer"):  # GPT-2: joint c_attn, Conv1D [d_model, 3 d_model], queries first
        queries = (slice(None), slice(0, model.cfg.d_model))
        weights = [(blk.attn.c_attn.weight, queries) for blk in hf.transformer.h]
    else:
        weights = [(layer.self_attn.q_proj.weight, (slice(None), slice(None))) for layer in hf.model.layers]
    saved = [w.detach().clone() for w, _ in weights]
    with torch.no_grad():
        for w, index in weights:
            w[index] *= factor
    try:
        yield
    finally:
        with torch.no_grad():
            for (w, _), s in zip(weights, saved):
                w.copy_(s)


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol


# ---------------------------------------------------------------- restoration semantics


def test_no_op_edit_gives_three_identical_states(model):
    saved = _params(model)
    cs = case_study(model, EIFFEL, PROMPT, "Paris", edit_fn=contextlib.nullcontext)
    assert _unchanged(model, saved)
    assert cs.method == "custom"
    for state in (cs.post, cs.restored):
        for field in ("p_true", "p_new", "logodds", "top_prob"):
            assert _close(getattr(state, field), getattr(cs.pre, field), 1e-6)
        assert state.top_token == cs.pre.top_token
    assert torch.equal(cs.rows_before, cs.rows_after)
    assert all(h.delta == 0.0 for h in cs.top_heads)


def test_attention_only_edit_is_undone_by_restoring_every_pattern(model):
    """Restoring all patterns recovers the pre-edit prediction exactly when the edit changes only
    the attention patterns (query weights), and not when it is left out of any layer."""
    saved = _params(model)
    cs = case_study(model, EIFFEL, PROMPT, "Paris", edit_fn=lambda: sharpen_queries(model))
    assert _unchanged(model, saved)
    assert not _close(cs.post.logodds, cs.pre.logodds, 1e-3)
    assert (cs.rows_after - cs.rows_before).abs().amax(dim=(1, 2)).min() > 1e-4  # every layer drifted
    for field in ("p_true", "p_new", "logodds", "top_prob"):
        assert _close(getattr(cs.restored, field), getattr(cs.pre, field)), field
    assert cs.restored.top_token == cs.pre.top_token


def _manual_restored_probs(model, edit_fn, prompt, targets):
    """P(target) of the edited model with every layer's hook_pattern replaced by the pre-edit one."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    batch = tokens.batch_with_targets(model, [prompt] * len(targets), list(targets))
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                        names_filter=lambda n: n in names)
        clean = {n: cache[n].clone() for n in names}
        with edit_fn():
            hooks = [(n, lambda act, hook: clean[hook.name]) for n in names]
            logits = model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    return tokens.target_log_probs(logits, batch).exp()


def test_mlp_edit_drifts_later_layers_and_restoration_matches_manual_hooks(model):
    edit_fn = lambda: push_subject(model, EIFFEL, layer=0)  # noqa: E731
    saved = _params(model)
    cs = case_study(model, EIFFEL, PROMPT, "Paris", edit_fn=edit_fn)
    assert _unchanged(model, saved)
    # Layer 0's attention runs before its edited MLP; layer 1 reads the edited residual stream.
    assert torch.equal(cs.rows_after[0], cs.rows_before[0])
    assert (cs.rows_after[1] - cs.rows_before[1]).abs().max() > 1e-5
    assert not _close(cs.post.logodds, cs.pre.logodds, 1e-3)  # random model: no sign to expect
    # Restoring patterns does not undo an MLP edit (the values still carry it) ...
    assert not _close(cs.restored.logodds, cs.pre.logodds, 1e-3)
    # ... and equals an independent restoration written with plain hooks.
    manual = _manual_restored_probs(model, edit_fn, PROMPT, ["Paris", "Rome"])
    assert _close(cs.restored.p_true, float(manual[0])) and _close(cs.restored.p_new, float(manual[1]))
    assert _close(cs.restored.logodds, float(manual[0].log() - manual[1].log()), 1e-4)
    # Top-1 is the argmax of the same distribution the single-token targets are read from.
    for state in cs.predictions.values():
        assert state.top_prob >= max(state.p_true, state.p_new) - 1e-7


def test_rome_edit_leaves_every_weight_bitwise_unchanged(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))
    cfg = ROMEConfig(layer=0, steps=6, context_templates=((4, 2),), weight_decay=0.0,
                     stats=StatsConfig(corpus="model", n_samples=32, seq_len=24))
    saved = _params(tiny_llama)
    cs = case_study(tiny_llama, EIFFEL, PROMPT, "Paris", method="rome", config=cfg)
    assert _unchanged(tiny_llama, saved)
    assert cs.method == "rome"
    assert (cs.rows_after[1] - cs.rows_before[1]).abs().max() > 1e-5  # the edit did happen inside
    assert not _close(cs.post.logodds, cs.pre.logodds, 1e-4)


# ---------------------------------------------------------------- shapes and ordering


def test_shapes_subject_position_and_top_k_order(model):
    cs = case_study(model, EIFFEL, PROMPT, "Paris", edit_fn=lambda: push_subject(model, EIFFEL), top_k=5)
    n = len(tokens.encode(model, PROMPT))
    assert len(cs.tokens) == n and "".join(cs.tokens) == PROMPT
    shape = (model.cfg.n_layers, model.cfg.n_heads, n)
    assert cs.rows_before.shape == cs.rows_after.shape == shape
    torch.testing.assert_close(cs.rows_before.sum(-1), torch.ones(shape[:2]))
    torch.testing.assert_close(cs.rows_after.sum(-1), torch.ones(shape[:2]))
    first = tokens.subject_spans(model, PROMPT, EIFFEL.subject)[0]
    assert cs.subject_last == first[1] and cs.tokens[cs.subject_last].strip() == "Tower"
    assert cs.new_target == "Rome" and cs.true_target == "Paris" and cs.prompt == PROMPT
    assert len(cs.top_heads) == 5 and all(isinstance(h, HeadChange) for h in cs.top_heads)
    deltas = [h.delta for h in cs.top_heads]
    assert deltas == sorted(deltas, reverse=True)
    for h in cs.top_heads:
        assert h.before == pytest.approx(float(cs.rows_before[h.layer, h.head, cs.subject_last]), abs=1e-7)
        assert h.after == pytest.approx(float(cs.rows_after[h.layer, h.head, cs.subject_last]), abs=1e-7)
    best = int(cs.drift.flatten().argmax())
    assert (cs.top_heads[0].layer, cs.top_heads[0].head) == divmod(best, model.cfg.n_heads)
    assert cs.kl.shape == shape[:2] and bool((cs.kl >= -1e-6).all())
    everything = case_study(model, EIFFEL, PROMPT, "Paris", edit_fn=contextlib.nullcontext, top_k=100)
    assert len(everything.top_heads) == model.cfg.n_layers * model.cfg.n_heads


def test_to_json_is_plain_and_round_trips(tiny_llama):
    cs = case_study(tiny_llama, EIFFEL, PROMPT, "Paris", edit_fn=lambda: push_subject(tiny_llama, EIFFEL))
    data = cs.to_json()
    text = json.dumps(data, allow_nan=False)
    loaded = json.loads(text)
    assert set(loaded["predictions"]) == {"pre", "post", "restored"}
    assert loaded["predictions"]["post"]["p_new"] == cs.post.p_new
    assert len(loaded["rows_before"]) == tiny_llama.cfg.n_layers
    assert loaded["top_heads"][0]["delta"] == pytest.approx(cs.top_heads[0].delta)
    back = CaseStudy.from_json(loaded)
    assert torch.equal(back.rows_before, cs.rows_before) and torch.equal(back.rows_after, cs.rows_after)
    for f in dataclasses.fields(CaseStudy):
        if f.name not in ("rows_before", "rows_after"):
            assert getattr(back, f.name) == getattr(cs, f.name), f.name


# ---------------------------------------------------------------- figure and view


def test_figure_draws_the_three_states_and_the_top_heads_rows(tiny_gpt2):
    cs = case_study(tiny_gpt2, EIFFEL, PROMPT, "Paris", edit_fn=lambda: push_subject(tiny_gpt2, EIFFEL), top_k=3)
    fig = case_study_figure(cs, title="Case study: a long title that has to wrap " * 4)
    assert isinstance(fig, go.Figure)
    assert [type(t).__name__ for t in fig.data] == ["Bar", "Bar", "Heatmap", "Heatmap"]
    p_true, p_new, before, after = fig.data
    assert (p_true.name, p_new.name) == ("P(Paris)", f"P({EIFFEL.target_new.strip()})")
    # three states, each with its top-1 token and its P(true) / P(new)
    assert len(p_true.x) == 3 and [x.split("<br>")[0] for x in p_true.x] == [STATE_LABELS[s] for s in STATES]
    for x, state in zip(p_true.x, STATES):
        assert token_label(repr(cs.predictions[state].top_token)) in x
    assert list(p_true.y) == [cs.predictions[s].p_true for s in STATES]
    assert list(p_new.y) == [cs.predictions[s].p_new for s in STATES]
    assert list(p_true.text) == [f"{cs.predictions[s].p_true:.3f}" for s in STATES]
    layers, heads = [h.layer for h in cs.top_heads], [h.head for h in cs.top_heads]
    assert [before.name, after.name] == ["before", "after"]
    torch.testing.assert_close(torch.tensor(before.z, dtype=torch.float32), cs.rows_before[layers, heads])
    torch.testing.assert_close(torch.tensor(after.z, dtype=torch.float32), cs.rows_after[layers, heads])
    assert len(fig.layout.xaxis2.ticktext) == len(cs.tokens)
    assert "Tower" in fig.layout.xaxis2.ticktext[cs.subject_last]
    assert list(fig.layout.yaxis2.ticktext) == [h.label for h in cs.top_heads]
    assert fig.layout.template.layout.paper_bgcolor is not None  # plotly_white applied
    assert "attention restored" in " ".join(a.text for a in fig.layout.annotations)  # the panel titles
    assert all(len(line) <= TITLE_CHARS for line in fig.layout.title.text.split("<br>"))
    assert len(fig.layout.shapes) == 2 and fig.layout.shapes[0].x0 == cs.subject_last - 0.5


def test_view_is_offline_with_two_labelled_panels(tiny_llama):
    cs = case_study(tiny_llama, EIFFEL, PROMPT, "Paris", edit_fn=lambda: push_subject(tiny_llama, EIFFEL), top_k=2)
    view = case_study_view(cs)
    assert isinstance(view, AttentionView) and len(view.panels) == 2 and view.side_by_side
    assert view.panels[0][0].startswith("before") and view.panels[1][0].startswith("after")
    page = view.page()
    assert "unpkg.com" not in page and "var CircuitsVis=" in page
    for h in cs.top_heads:
        assert h.label in page


# ---------------------------------------------------------------- bad input


class _Never:
    calls = 0

    def __call__(self):
        _Never.calls += 1
        return contextlib.nullcontext()


BAD = {
    "empty prompt": (dict(distract_prompt="   "), "empty"),
    "subject missing": (dict(distract_prompt="The Louvre is in"), "does not occur"),
    "no edit sentence": (dict(distract_prompt="The Eiffel Tower is located in Paris. The Louvre is in"),
                         "does not start with the edit sentence"),
    "only the edit sentence": (dict(distract_prompt=EIFFEL.edit_sentence), "only the edit sentence"),
    "top_k zero": (dict(top_k=0), "top_k"),
    "true target is new target": (dict(true_target=" Rome"), "new target"),
    "empty true target": (dict(true_target=" "), "empty"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_editing(tiny_llama, name):
    changes, message = BAD[name]
    kwargs = dict(distract_prompt=PROMPT, true_target="Paris", top_k=6) | changes
    saved, calls = _params(tiny_llama), _Never.calls
    with pytest.raises(CaseStudyError, match=message) as err:
        case_study(tiny_llama, EIFFEL, kwargs["distract_prompt"], kwargs["true_target"],
                   edit_fn=_Never(), top_k=kwargs["top_k"])
    assert isinstance(err.value, ValueError)
    assert _Never.calls == calls and _unchanged(tiny_llama, saved)


def test_bad_method_and_bad_edit_fn(tiny_llama):
    with pytest.raises(CaseStudyError, match="unknown method"):
        case_study(tiny_llama, EIFFEL, PROMPT, "Paris", method="nope")
    with pytest.raises(CaseStudyError, match="not a context manager"):
        case_study(tiny_llama, EIFFEL, PROMPT, "Paris", edit_fn=lambda: 3)


# ---------------------------------------------------------------- real model (slow)

REAL = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "New York", "Paris")
SLOW_STATS = StatsConfig(n_samples=64, seq_len=64)  # as tests/test_editing.py: cheap, cached


@pytest.mark.slow
def test_case_study_on_smollm2_rome(smollm2):
    cfg = dataclasses.replace(ROMEConfig.for_model(smollm2), stats=SLOW_STATS, context_templates=((5, 5),))
    saved = _params(smollm2)
    cs = case_study(smollm2, REAL, distract_prompt(REAL, "The Louvre is located in"), "Paris", config=cfg)
    assert _unchanged(smollm2, saved)
    assert cs.pre.top_token.strip() == "Paris" and cs.pre.p_true > cs.pre.p_new
    assert cs.post.p_new > cs.pre.p_new + 0.01           # the edit leaks into the Louvre prompt
    assert cs.restored.p_new < cs.post.p_new - 0.005     # restoring the attention pulls it back
    assert cs.top_heads[0].delta > 0.05                  # some head attends much more to " Tower"
    assert cs.tokens[cs.subject_last].strip() == "Tower"
