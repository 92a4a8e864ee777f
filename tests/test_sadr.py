import pytest
import torch

from attention_drift.sadr import SADRConfig, divergence, hinge_mask, sadr_loss


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
    before = _rows(torch.rand(3, 2, 4, 6).tolist())
    now = _rows(torch.rand(3, 2, 4, 6).tolist())
    subject = torch.tensor([0, 3, 5])
    loss, mask = sadr_loss(before, now, subject, SADRConfig(weight=0.5))
    expected = 0.5 * (divergence(before, now) * mask).sum() / 3
    torch.testing.assert_close(loss, expected)


def test_loss_has_gradient_reaching_the_current_rows():
    before = _rows(torch.rand(2, 2, 3, 4).tolist())
    logits = torch.randn(2, 2, 3, 4, requires_grad=True)
    loss, _ = sadr_loss(before, logits.softmax(-1), torch.tensor([1, 2]), SADRConfig(selection="all"))
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
