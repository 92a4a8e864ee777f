import pytest
import torch

from attention_drift.core import tokens


def test_continuation_tokens_join_to_the_full_string(tiny_llama):
    prompt_ids, target_ids = tokens.continuation_ids(tiny_llama, "The Eiffel Tower is in", "Paris")
    assert prompt_ids + target_ids == tokens.encode(tiny_llama, "The Eiffel Tower is in Paris")
    assert tiny_llama.tokenizer.decode(target_ids) == " Paris"


def test_target_is_stripped_and_empty_target_rejected(tiny_llama):
    assert tokens.continuation_ids(tiny_llama, "Paris is in", "  France ")[1] == tokens.continuation_ids(
        tiny_llama, "Paris is in", "France"
    )[1]
    with pytest.raises(ValueError, match="empty target"):
        tokens.continuation_ids(tiny_llama, "Paris is in", "   ")


def test_bos_added_once_when_the_model_expects_it(tiny_llama):
    bos = tiny_llama.tokenizer.bos_token_id
    tiny_llama.cfg.default_prepend_bos = True
    ids = tokens.encode(tiny_llama, "The Louvre")
    assert ids[0] == bos and ids[1] != bos
    first, last = tokens.subject_span(tiny_llama, "The Louvre is in Paris", "Louvre")
    assert tiny_llama.tokenizer.decode(tokens.encode(tiny_llama, "The Louvre is in Paris")[first : last + 1]) == " Louvre"
    tiny_llama.cfg.default_prepend_bos = False
    assert tokens.encode(tiny_llama, "The Louvre")[0] != bos


def test_right_padding_keeps_positions(tiny_llama):
    batch = tokens.batch_with_targets(tiny_llama, ["Paris is in", "The Eiffel Tower is located in"], ["France", "Paris"])
    assert batch.attention_mask[0].sum() == batch.lengths[0]
    assert batch.attention_mask[0, : batch.lengths[0]].all() and not batch.attention_mask[0, batch.lengths[0] :].any()
    for i, (p, t) in enumerate([("Paris is in", "France"), ("The Eiffel Tower is located in", "Paris")]):
        single = tokens.encode(tiny_llama, f"{p} {t}")
        assert batch.input_ids[i, : len(single)].tolist() == single


def test_target_log_probs_batched_equals_single(tiny_llama):
    prompts, targets = ["Paris is in", "The Eiffel Tower is located in the city of"], ["France", "New Paris"]
    batch = tokens.batch_with_targets(tiny_llama, prompts, targets)
    with torch.no_grad():
        batched = tokens.target_log_probs(tiny_llama(batch.input_ids, attention_mask=batch.attention_mask), batch)
        for i in range(2):
            one = tokens.batch_with_targets(tiny_llama, prompts[i : i + 1], targets[i : i + 1])
            single = tokens.target_log_probs(tiny_llama(one.input_ids), one)
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_target_log_probs_is_mean_over_target_tokens():
    """Hand-made logits: row 0 target = two tokens with log-probs log(.5), log(.25)."""
    batch = tokens.Batch(
        input_ids=torch.tensor([[0, 1, 2, 3]]),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        prompt_lengths=torch.tensor([2]),
        target_lengths=torch.tensor([2]),
    )
    logits = torch.full((1, 4, 4), -1e9)
    logits[0, 1, 2], logits[0, 1, 0] = 0.0, 0.0  # P(token 2 | pos 1) = 0.5
    logits[0, 2, :] = 0.0  # P(token 3 | pos 2) = 0.25
    expected = (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25))) / 2
    torch.testing.assert_close(tokens.target_log_probs(logits, batch)[0], expected, atol=1e-5, rtol=1e-5)


def test_subject_spans_find_every_occurrence(tiny_llama):
    text = "The Eiffel Tower is in Rome. The Eiffel Tower is located in"
    spans = tokens.subject_spans(tiny_llama, text, "Eiffel Tower")
    ids = tokens.encode(tiny_llama, text)
    assert len(spans) == 2
    for first, last in spans:
        assert tiny_llama.tokenizer.decode(ids[first : last + 1]).strip() == "Eiffel Tower"
    assert tokens.subject_span(tiny_llama, text, "Eiffel Tower") == spans[-1]
    assert tokens.subject_span(tiny_llama, text, "Eiffel Tower", occurrence=0) == spans[0]


def test_missing_or_empty_subject_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="does not occur"):
        tokens.subject_span(tiny_llama, "The Louvre is in Paris", "Colosseum")
    with pytest.raises(ValueError, match="empty subject"):
        tokens.subject_span(tiny_llama, "The Louvre is in Paris", " ")
