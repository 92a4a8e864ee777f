import math

import pytest
import torch

from attention_drift.measure import evaluate as E
from attention_drift.measure import fluency
from attention_drift.measure import groups as G
from attention_drift.core import tokens
from attention_drift.core.data import Commonsense, PromptGroup, Record, Rewrite, load_example
from attention_drift.core.scores import PairScores, continuation_log_probs

REWRITE = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")


def _record(**groups) -> Record:
    empty = PromptGroup()
    fields = dict(
        case_id=7, kind="counterfact", rewrite=REWRITE,
        efficacy=PromptGroup((REWRITE.prompt,), ("Rome",)),
        paraphrase=PromptGroup(("The Eiffel Tower stands in",), ("Rome",)),
        reasoning=PromptGroup(("The river of the city of the Eiffel Tower is",), ("Tiber",)),
        subject_alias=PromptGroup(("The Tour Eiffel is located in",), ("Rome",)),
        neighborhood=PromptGroup(("The Louvre is located in", "The Colosseum is located in"), ("Paris", " Rome ")),
        relation=PromptGroup(("The Eiffel Tower was designed by",), ("Gustave Eiffel",)),
        commonsense=Commonsense("To cool a drink", "add ice.", "add hot stones."),
        generation=(),
    )
    fields.update(groups)
    for key in ("efficacy", "paraphrase", "reasoning", "subject_alias", "neighborhood", "relation"):
        fields.setdefault(key, empty)
    return Record(**fields)


# --- metric arithmetic ---------------------------------------------------------------------

def _hand_made(p_first: float, p_second_right: float, p_second_wrong: float):
    """Two rows, prompt = token 0, targets = (1, 2) and (1, 3), with known token probabilities."""
    batch = tokens.Batch(
        input_ids=torch.tensor([[0, 1, 2], [0, 1, 3]]),
        attention_mask=torch.ones(2, 3, dtype=torch.long),
        prompt_lengths=torch.tensor([1, 1]),
        target_lengths=torch.tensor([2, 2]),
    )
    probs = torch.full((2, 3, 4), 1e-3)
    for row, p_second, tok in ((0, p_second_right, 2), (1, p_second_wrong, 3)):
        probs[row, 0, 1] = p_first
        probs[row, 1, tok] = p_second
    probs = probs / probs.sum(-1, keepdim=True)
    log_probs = tokens.target_log_probs(probs.log(), batch)
    return PairScores(log_probs[:1].double(), log_probs[1:].double()), probs


def test_geometric_mean_probability_and_correct_flag():
    scores, probs = _hand_made(0.5, 0.4, 0.1)
    expected_right = math.sqrt(probs[0, 0, 1] * probs[0, 1, 2])
    expected_wrong = math.sqrt(probs[1, 0, 1] * probs[1, 1, 3])
    assert scores.p_right.item() == pytest.approx(expected_right, rel=1e-5)
    assert scores.p_wrong.item() == pytest.approx(expected_wrong, rel=1e-5)
    assert scores.correct.tolist() == [True]
    flipped = PairScores(scores.log_p_wrong, scores.log_p_right)
    assert flipped.correct.tolist() == [False]


def test_tie_is_not_correct():
    scores, _ = _hand_made(0.5, 0.3, 0.3)
    assert scores.p_right.item() == pytest.approx(scores.p_wrong.item())
    assert scores.correct.tolist() == [False]


# --- which strings are scored --------------------------------------------------------------

def test_record_pairs_right_and_wrong_per_group():
    pairs, skipped = E.record_pairs(_record())
    as_tuples = {name: [(p.prompt, p.right, p.wrong) for p in ps] for name, ps in pairs.items()}
    assert as_tuples["efficacy"] == [(REWRITE.prompt, "Rome", "Paris")]
    assert as_tuples["paraphrase"] == [("The Eiffel Tower stands in", "Rome", "Paris")]
    assert as_tuples["subject_alias"] == [("The Tour Eiffel is located in", "Rome", "Paris")]
    assert as_tuples["reasoning"] == [("The river of the city of the Eiffel Tower is", "Tiber", "Paris")]
    assert as_tuples["neighborhood"] == [("The Louvre is located in", "Paris", "Rome")]
    assert as_tuples["relation"] == [("The Eiffel Tower was designed by", "Gustave Eiffel", "Rome")]
    assert as_tuples["commonsense"] == [("To cool a drink", "add ice.", "add hot stones.")]
    assert skipped["neighborhood"] == 1 and skipped["distract_neighborhood"] == 1
    assert sum(skipped[name] for name in E.BASE_GROUPS) == 2


def test_distract_prompts_are_scored_exactly(monkeypatch):
    calls = []

    def fake_score_pairs(model, prompts, rights, wrongs, *, batch_size, next_token=()):
        calls.append((list(prompts), list(rights), list(wrongs)))
        n = len(prompts)
        return PairScores(torch.zeros(n, dtype=torch.float64), torch.full((n,), -1.0, dtype=torch.float64))

    monkeypatch.setattr(E, "score_pairs", fake_score_pairs)
    scores = E.evaluate_record(object(), _record())
    assert len(calls) == 1, "all groups must share one batched scoring call"
    prompts, rights, wrongs = calls[0]
    scored = set(zip(prompts, rights, wrongs))
    assert ("The Eiffel Tower is located in Rome. The Louvre is located in", "Paris", "Rome") in scored
    assert ("The Eiffel Tower is located in Rome. The Eiffel Tower was designed by", "Gustave Eiffel", "Rome") in scored
    assert ("The Eiffel Tower is located in Rome. To cool a drink", "add ice.", "add hot stones.") in scored
    assert not any("Colosseum" in p for p in prompts)
    assert len(prompts) == 10
    assert set(scores.groups) == set(E.BASE_GROUPS)  # the suite is opt-in
    assert len(scores.groups["distract_neighborhood"]) == 1
    assert scores.groups["distract_neighborhood"].skipped == 1
    assert scores.groups["efficacy"].correct == (True,)
    assert scores.groups["efficacy"].p_right == (1.0,)


def test_groups_without_prompts_are_left_out(monkeypatch):
    record = _record(reasoning=PromptGroup(), relation=PromptGroup(), commonsense=None)
    pairs, _ = E.record_pairs(record)
    assert pairs["relation"] == [] and pairs["distract_relation"] == [] and pairs["commonsense"] == []


SUITE_RECORD = dict(
    paraphrase=PromptGroup(("The Eiffel Tower stands in", "Where is the Eiffel Tower? In"), ("Rome", "Rome")),
    neighborhood=PromptGroup(("The Louvre is located in", "Notre-Dame is located in", "The Colosseum is in"),
                             ("Paris", "Paris", "Rome")),
)


def test_suite_prompts_by_hand():
    """Each suite group's prompts, written out by hand (neighbour i takes paraphrase i mod 2; the
    Colosseum's answer is the new target, so it is skipped in every neighbourhood context)."""
    pairs, skipped = E.record_pairs(_record(**SUITE_RECORD))
    got = {name: [(p.prompt, p.right, p.wrong) for p in pairs[name]] for name in E.SUITE_GROUPS}
    assert got["restated_neighborhood"] == [
        ("The Eiffel Tower stands in Rome. The Louvre is located in", "Paris", "Rome"),
        ("Where is the Eiffel Tower? In Rome. Notre-Dame is located in", "Paris", "Rome")]
    assert got["mention_neighborhood"] == [
        ("I read an article about Eiffel Tower. The Louvre is located in", "Paris", "Rome"),
        ("I read an article about Eiffel Tower. Notre-Dame is located in", "Paris", "Rome")]
    quiet = "It was a quiet day. Nothing much happened in the morning. Later, everyone went back to work."
    assert got["distant_neighborhood"] == [
        (f"The Eiffel Tower is located in Rome. {quiet} The Louvre is located in", "Paris", "Rome"),
        (f"The Eiffel Tower is located in Rome. {quiet} Notre-Dame is located in", "Paris", "Rome")]
    assert got["double_neighborhood"] == [
        ("The Eiffel Tower is located in Rome. The Eiffel Tower stands in Rome. The Louvre is located in",
         "Paris", "Rome"),
        ("The Eiffel Tower is located in Rome. Where is the Eiffel Tower? In Rome. Notre-Dame is located in",
         "Paris", "Rome")]
    assert got["mention_relation"] == [
        ("I read an article about Eiffel Tower. The Eiffel Tower was designed by", "Gustave Eiffel", "Rome")]
    assert {name: skipped[name] for name in E.SUITE_GROUPS} == {
        "restated_neighborhood": 1, "mention_neighborhood": 1, "distant_neighborhood": 1,
        "double_neighborhood": 1, "mention_relation": 0}
    for name in E.SUITE_GROUPS:
        assert E.GROUPS[name].abbrev and "(suite)" in E.GROUPS[name].description


def test_suite_without_paraphrases_has_no_restated_contexts():
    pairs, _ = E.record_pairs(_record(paraphrase=PromptGroup()))
    assert pairs["restated_neighborhood"] == [] and pairs["double_neighborhood"] == []
    assert len(pairs["mention_neighborhood"]) == len(pairs["distant_neighborhood"]) == 1


def test_suite_prompts_are_built_from_the_record_only():
    """A suite prompt is a context made of the record's own edit, paraphrases and subject (and the
    fixed templates) in front of one of its own neighbour / relation prompts: nothing of another
    record gets in, whatever was built before."""
    other = Record(
        case_id=8, kind="wikidata", rewrite=Rewrite("Mount Fuji is located in", "Mount Fuji", "Chile", "Japan"),
        efficacy=PromptGroup(("Mount Fuji is located in",), ("Chile",)),
        paraphrase=PromptGroup(("Mount Fuji rises in",), ("Chile",)), reasoning=PromptGroup(), subject_alias=PromptGroup(),
        neighborhood=PromptGroup(("Lake Biwa is in",), ("Japan",)),
        relation=PromptGroup(("Mount Fuji is climbed by",), ("pilgrims",)), commonsense=None, generation=())
    mine = _record(**SUITE_RECORD)
    E.record_pairs(other)
    pairs, _ = E.record_pairs(mine)
    foreign = ["Mount Fuji", "Chile", "Japan", "Lake Biwa", "rises", "pilgrims", "climbed"]
    rw = mine.rewrite
    pieces = [rw.edit_sentence, G.FILLER, G.MENTION.format(subject=rw.subject)]
    pieces += [f"{p} {rw.target_new}." for p in mine.paraphrase.prompts]
    own = {"neighborhood": mine.neighborhood.prompts, "relation": mine.relation.prompts}
    for name in E.SUITE_GROUPS:
        assert pairs[name]
        for pair in pairs[name]:
            assert not any(f in text for f in foreign for text in (pair.prompt, pair.right, pair.wrong))
            source = own["relation" if name.endswith("relation") else "neighborhood"]
            tail = next(p for p in source if pair.prompt.endswith(" " + p))
            context = pair.prompt[: -len(tail)]
            for piece in sorted(pieces, key=len, reverse=True):
                context = context.replace(piece, "")
            assert context.strip() == "", (name, pair.prompt)


def test_suite_is_scored_only_when_asked(monkeypatch):
    calls = []

    def fake_score_pairs(model, prompts, rights, wrongs, *, batch_size, next_token=()):
        calls.append(list(prompts))
        n = len(prompts)
        return PairScores(torch.zeros(n, dtype=torch.float64), torch.full((n,), -1.0, dtype=torch.float64))

    monkeypatch.setattr(E, "score_pairs", fake_score_pairs)
    record = _record(**SUITE_RECORD)
    base = E.evaluate_record(object(), record)
    suite = E.evaluate_record(object(), record, groups=E.BASE_GROUPS + E.SUITE_GROUPS)
    assert set(base.groups) == set(E.BASE_GROUPS) and not set(base.groups) & set(E.SUITE_GROUPS)
    assert set(suite.groups) == set(E.GROUPS)
    assert not any(p.startswith("I read an article") for p in calls[0])
    pairs, _ = E.record_pairs(record)
    assert calls[1] == calls[0] + [p.prompt for name in E.SUITE_GROUPS for p in pairs[name]]
    assert len(suite.groups["restated_neighborhood"]) == 2 and suite.groups["restated_neighborhood"].skipped == 1
    assert E.BASE_GROUPS + E.SUITE_GROUPS == tuple(E.GROUPS)


def test_every_group_has_a_description():
    for name, group in E.GROUPS.items():
        assert group.name == name
        assert "right" in group.description and "wrong" in group.description
    assert set(E.AVG_S_GROUPS) <= set(E.GROUPS)


# --- real forwards on the tiny model -------------------------------------------------------

def test_batched_equals_unbatched(tiny_llama):
    for record in load_example()[:4]:
        one = E.evaluate_record(tiny_llama, record, batch_size=1)
        many = E.evaluate_record(tiny_llama, record, batch_size=32)
        assert one.groups.keys() == many.groups.keys()
        for name in one.groups:
            a, b = one.groups[name], many.groups[name]
            assert torch.allclose(torch.tensor(a.p_right).log(), torch.tensor(b.p_right).log(), atol=1e-5)
            assert torch.allclose(torch.tensor(a.p_wrong).log(), torch.tensor(b.p_wrong).log(), atol=1e-5)
            assert a.correct == b.correct


def test_continuation_log_probs_match_one_row_per_pair(tiny_gpt2):
    record = load_example()[0]
    pairs, _ = E.record_pairs(record)
    flat = [p for ps in pairs.values() for p in ps]
    prompts = [p.prompt for p in flat] * 2
    targets = [p.right for p in flat] + [p.wrong for p in flat]
    fast = continuation_log_probs(tiny_gpt2, prompts, targets, batch_size=5)
    lengths = {len(tokens.continuation_ids(tiny_gpt2, p, t)[1]) for p, t in zip(prompts, targets)}
    assert 1 in lengths and max(lengths) > 1, "the check needs single- and multi-token targets"
    batch = tokens.batch_with_targets(tiny_gpt2, prompts, targets)
    with torch.no_grad():
        logits = tiny_gpt2(batch.input_ids, attention_mask=batch.attention_mask)
    slow = tokens.target_log_probs(logits, batch).double()
    assert torch.allclose(fast, slow, atol=1e-5)


def test_score_pairs_flags_follow_probabilities(tiny_llama):
    scores = E.score_pairs(tiny_llama, ["The Louvre is in", "Lionel Messi plays"], ["Paris", "soccer"],
                           ["Rome", "basketball"])
    assert len(scores) == 2
    assert ((scores.p_right > 0) & (scores.p_right <= 1)).all()
    assert scores.correct.tolist() == (scores.p_right > scores.p_wrong).tolist()


def test_score_pairs_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="same length"):
        E.score_pairs(tiny_llama, ["a"], ["b"], [])
    with pytest.raises(ValueError, match="batch_size"):
        E.score_pairs(tiny_llama, ["a"], ["b"], ["c"], batch_size=0)


def test_record_scores_json_round_trip(tiny_llama):
    scores = E.evaluate_record(tiny_llama, load_example()[1])
    again = E.RecordScores.from_json(scores.case_id, scores.to_json())
    assert again == scores


# --- aggregation ---------------------------------------------------------------------------

def _scores(case_id, flags, p_right=None):
    p_right = p_right or [0.5] * len(flags)
    return E.RecordScores(case_id, {"efficacy": E.GroupScores(tuple(p_right), (0.1,) * len(flags), tuple(flags), 1)})


def test_pooled_accuracy_and_interval():
    rows = [_scores(0, [True, False, True], [0.2, 0.4, 0.6]), _scores(1, [True], [1.0])]
    stats = E.aggregate(rows)["efficacy"]
    assert stats.n == 4 and stats.accuracy == pytest.approx(0.75)
    half = 1.96 * math.sqrt(0.75 * 0.25 / 4)
    assert stats.half_width == pytest.approx(half)
    assert stats.ci95 == pytest.approx((0.75 - half, 1.0))
    assert stats.mean_p_right == pytest.approx(0.55)
    assert stats.skipped == 2


def test_per_record_accuracy():
    rows = [_scores(0, [True, False, True]), _scores(1, [True])]
    stats = E.aggregate(rows, per_record=True)["efficacy"]
    assert stats.n == 2 and stats.accuracy == pytest.approx((2 / 3 + 1) / 2)
    std = math.sqrt(((2 / 3 - 5 / 6) ** 2 + (1 - 5 / 6) ** 2) / 2)
    assert stats.half_width == pytest.approx(1.96 * std / math.sqrt(2))


def test_interval_clipped_at_zero():
    stats = E.aggregate([_scores(0, [False, False, False, True])])["efficacy"]
    assert stats.ci95[0] == 0.0 and stats.ci95[1] == pytest.approx(0.25 + 1.96 * math.sqrt(0.25 * 0.75 / 4))


def test_harmonic_mean_and_avg_s():
    assert E.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert E.harmonic_mean([0.5, 0.0]) == 0.0
    stat = lambda a: E.GroupStats(a, (a, a), 0.0, 10, 0.5, 0.5)  # noqa: E731
    stats = {name: stat(0.5) for name in E.AVG_S_GROUPS}
    stats["efficacy"] = stat(1.0)
    assert E.avg_s(stats) == pytest.approx(5 / (1 + 4 * 2))
    del stats["relation"]
    assert E.avg_s(stats) is None


# --- fluency -------------------------------------------------------------------------------

def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (a,b) x2, (b,a) x1
    h3 = 1.0  # trigrams (a,b,a), (b,a,b)
    assert E.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert E.ngram_entropy("") == 0.0 and E.ngram_entropy("one") == 0.0
    assert E.ngram_entropy("a, b") == E.ngram_entropy("a , b")


def test_repetition_lowers_ngram_entropy():
    varied = "The tower was built for the fair of 1889 and later became the symbol of the city."
    repeated = "the city the city the city the city the city the city the city the city"
    assert E.ngram_entropy(repeated) < 1.0 < E.ngram_entropy(varied)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_model_shares_current_weights(arch):
    from attention_drift.core.models import mlp_out_weight, tiny_model

    model = tiny_model(arch)
    batch = tokens.batch_prompts(model, ["The Louvre is in Paris", "Toyota is"])
    with torch.no_grad():
        mlp_out_weight(model, 0).add_(0.5)
        clone = fluency._generation_model(model)
        expected = model(batch.input_ids, attention_mask=batch.attention_mask)
        got = clone(batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(got, expected, atol=1e-4)


def test_generation_is_seeded_full_length_and_ignores_eos(tiny_llama):
    config = E.FluencyConfig(max_length=24, seed=3)
    prompts = ["The Eiffel Tower is", "Michael Jordan"]
    torch.manual_seed(123)
    ids = fluency._generate_ids(tiny_llama, prompts, config)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1)), "sampling must not move the global random state"
    assert [len(r) for r in ids] == [24, 24]
    assert [r[: len(tokens.encode(tiny_llama, p))] for r, p in zip(ids, prompts)] == [
        tokens.encode(tiny_llama, p) for p in prompts
    ]
    assert fluency._generate_ids(tiny_llama, prompts, config) == ids
    assert fluency._generate_ids(tiny_llama, prompts, E.FluencyConfig(max_length=24, seed=4)) != ids
    frequent = max(set(ids[0][5:]), key=ids[0][5:].count)
    tiny_llama.original_model.generation_config.eos_token_id = frequent
    assert fluency._generate_ids(tiny_llama, prompts, config) == ids


def test_evaluate_record_fluency(tiny_llama):
    records = load_example()
    config = E.FluencyConfig(max_length=20, per_prompt=2)
    cf = E.evaluate_record(tiny_llama, records[0], fluency=config)
    assert len(cf.fluency.texts) == 2 * len(records[0].generation)
    assert all(t.startswith(p) for t, p in zip(cf.fluency.texts[::2], records[0].generation))
    assert cf.fluency.ngram_entropy == tuple(E.ngram_entropy(t) for t in cf.fluency.texts)
    assert E.evaluate_record(tiny_llama, records[1], fluency=True).fluency is None
    assert E.evaluate_record(tiny_llama, records[0]).fluency is None
    stats = E.fluency_stats([cf])
    assert stats.n == 4 and stats.ngram_entropy == pytest.approx(cf.fluency.mean)


def test_fluency_config_validation():
    with pytest.raises(ValueError, match="max_length"):
        E.FluencyConfig(max_length=0)


def test_perplexity_by_hand(tiny_llama):
    texts = ["The Louvre is in Paris.", "Toyota is headquartered in Japan. The capital of France is Paris."]
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokens.encode(tiny_llama, text)])
            lp = tiny_llama(ids).log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
            nll -= lp.sum().item()
            count += ids.shape[1] - 1
    expected = math.exp(nll / count)
    assert fluency.perplexity(tiny_llama, texts) == pytest.approx(expected, rel=1e-4)
    assert fluency.perplexity(tiny_llama, texts, batch_size=1) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_smollm2_prefers_true_facts_before_editing(smollm2):
    records = {r.case_id: r for r in load_example()}
    # Facts SmolLM2-135M-Instruct knows (checked: P(true) > P(new) on each rewrite prompt).
    known = [records[i] for i in (0, 1, 4, 6)]
    scores = [E.evaluate_record(smollm2, r) for r in known]
    for record, s in zip(known, scores):
        eff = s.groups["efficacy"]
        assert eff.correct == (False,), f"{record.rewrite.prompt}: P(new) {eff.p_right} vs P(true) {eff.p_wrong}"
        assert eff.p_wrong[0] > 3 * eff.p_right[0]
    assert E.aggregate(scores)["efficacy"].accuracy == 0.0
    # The Louvre / Notre-Dame / Arc de Triomphe are in Paris; Jean Gabin's and Alain Delon's
    # language is French: correct before the edit, also with the edit sentence in front.
    for s in (scores[0], scores[2]):
        assert all(s.groups["neighborhood"].correct) and all(s.groups["distract_neighborhood"].correct)


def test_groups_are_checked_and_ordered_once_for_scoring_and_run_files():
    from attention_drift.measure.evaluate import BASE_GROUPS, ordered_groups
    from attention_drift.runs.evaluation import RunError, _groups_meta

    assert ordered_groups(["distract_neighborhood", "efficacy"]) == ["efficacy", "distract_neighborhood"]
    assert ordered_groups(None) is None
    with pytest.raises(ValueError, match="choose one or more of efficacy"):
        ordered_groups(["efficacy", "nope"])
    with pytest.raises(ValueError, match="choose one or more"):
        ordered_groups([])
    assert _groups_meta(list(reversed(BASE_GROUPS))) is None  # the default groups: no header entry
    assert _groups_meta(["paraphrase", "efficacy"]) == ["efficacy", "paraphrase"]
    with pytest.raises(RunError, match="nope.*choose one or more"):
        _groups_meta(["nope"])
