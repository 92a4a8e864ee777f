"""SADR: Selective Attention Drift Restriction (the paper's regulariser), and our extensions.

While an editor optimises its value vector, SADR compares, at every step and for every layer
at or above the edit layer, the attention row of each rewriting prompt's prediction position
(the last prompt token) with the same row of the unedited model (recorded at step 0, where the
injected delta is zero). A head is *selected* when its current attention to the subject's last
token exceeds the largest attention that any head of that layer paid that token before the
edit ("hinge" selection; recomputed every step, not differentiated). The loss is

    weight * sum_layers (1/N) sum_prompts sum_selected_heads D(before_row || current_row)

with D the KL divergence (eps 1e-8 inside the logs), or JS / squared L2. ``selection="all"``
restricts every head (the paper's non-selective ablation).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

EPS = 1e-8
SELECTIONS = ("hinge", "all")
DIVERGENCES = ("kl", "js", "l2")


@dataclass(frozen=True)
class SADRConfig:
    """How SADR regularises attention during an edit.

    Args:
        weight: gamma, the loss weight. It multiplies a sum over layers and heads, so its scale
            depends on model depth (published GPT-J values: ROME 0.01, MEMIT 0.005, PMET 0.08).
        layers: the layers regularised; None means every layer at or above the edit layer
            (layers below the injected delta cannot drift).
        selection: "hinge" (the paper's selective variant) or "all" heads.
        divergence: "kl" (published), "js" or "l2".
        steps: optimisation steps to use instead of the editor's own (the paper uses 80 for
            ROME+SADR against ROME's 20); None keeps the editor's.
        distract: also regularise distract-style prompts (the edit sentence followed by
            unrelated prompts), where specificity failure happens; our extension, off in the
            published variant.
    """

    weight: float = 0.01
    layers: tuple[int, ...] | None = None
    selection: str = "hinge"
    divergence: str = "kl"
    steps: int | None = None
    distract: bool = False

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"SADR selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"SADR divergence must be one of {DIVERGENCES}, not {self.divergence!r}")
        if self.weight < 0:
            raise ValueError(f"SADR weight must be >= 0, not {self.weight}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"SADR steps must be a positive number of optimisation steps, not {self.steps}")


def divergence(
    before: Float[Tensor, "*rows key"], now: Float[Tensor, "*rows key"], kind: str = "kl"
) -> Float[Tensor, "*rows"]:
    """D(before || now) per attention row: KL, Jensen-Shannon or squared L2 (eps 1e-8 in logs)."""
    if kind == "kl":
        return (before * ((before + EPS).log() - (now + EPS).log())).sum(-1)
    if kind == "js":
        mid = (before + now) / 2
        kl = lambda p, q: (p * ((p + EPS).log() - (q + EPS).log())).sum(-1)  # noqa: E731
        return (kl(before, mid) + kl(now, mid)) / 2
    if kind == "l2":
        return ((before - now) ** 2).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, not {kind!r}")


def hinge_mask(
    before: Float[Tensor, "prompt layer head key"],
    now: Float[Tensor, "prompt layer head key"],
    subject_last: Int[Tensor, " prompt"],
) -> Bool[Tensor, "prompt layer head"]:
    """Heads whose current attention to the subject's last token exceeds the pre-edit maximum
    over that layer's heads (strict), per prompt and layer."""
    index = subject_last.view(-1, 1, 1, 1).expand(-1, before.shape[1], before.shape[2], 1)
    before_subject = before.gather(-1, index)[..., 0]
    now_subject = now.gather(-1, index)[..., 0]
    return now_subject > before_subject.amax(-1, keepdim=True)


def sadr_loss(
    before: Float[Tensor, "prompt layer head key"],
    now: Float[Tensor, "prompt layer head key"],
    subject_last: Int[Tensor, " prompt"],
    config: SADRConfig,
) -> tuple[Float[Tensor, ""], Bool[Tensor, "prompt layer head"]]:
    """The SADR loss on the prediction-position attention rows, and the selected-head mask.

    ``before`` is the unedited model's rows (detached), ``now`` the current step's (live);
    rows are over right-padded key positions, where both are zero and contribute nothing.
    """
    if config.selection == "hinge":
        mask = hinge_mask(before, now.detach(), subject_last)
    else:
        mask = torch.ones(before.shape[:3], dtype=torch.bool, device=before.device)
    per_head = divergence(before, now, config.divergence) * mask
    n_prompts = before.shape[0]
    loss = config.weight * per_head.sum() / n_prompts
    return loss, mask
