"""Scores of prompts under one model state: the log-probability of continuations.

:func:`continuation_log_probs` and :func:`score_pairs` score continuations in shared batches (the
evaluation's metrics and SADR+'s check on an edit both read them here, below editing and
measurement); :func:`score_continuations` also hands back, from the same forward passes, the
argmax token at each teacher-forced target position and the full next-token distribution after
chosen prompts (token-level accuracies, neighbourhood KL); :class:`Scores` holds the true answer
against the edit's new target per prompt.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attention_drift.core import tokens


@dataclass(frozen=True)
class Scores:
    """Mean per-token log-probabilities (the paper's negated per-token NLL) of the true answer and
    of the edit's new target, one per prompt (or patched variant).

    ``p_true = exp(lp_true)`` is the geometric-mean token probability; ``logodds = lp_true -
    lp_new``; a prompt is failed (``prefers_new``) when ``lp_new > lp_true`` (strict, as the
    paper's correctness test).
    """

    lp_true: Float[Tensor, " n"]
    lp_new: Float[Tensor, " n"]

    @property
    def p_true(self) -> Float[Tensor, " n"]:
        return self.lp_true.exp()

    @property
    def p_new(self) -> Float[Tensor, " n"]:
        return self.lp_new.exp()

    @property
    def logodds(self) -> Float[Tensor, " n"]:
        return self.lp_true - self.lp_new

    @property
    def prefers_new(self) -> Bool[Tensor, " n"]:
        return self.lp_new > self.lp_true

    def pair(self, i: int = 0) -> list[float]:
        """``[lp_true, lp_new]`` of entry ``i`` as Python floats (the run files' layout)."""
        return [float(self.lp_true[i]), float(self.lp_new[i])]

    def cpu(self) -> "Scores":
        return Scores(self.lp_true.detach().cpu(), self.lp_new.detach().cpu())


@dataclass(frozen=True)
class PairScores:
    """Scores of prompt pairs: mean log-probability per target token of each continuation.

    From :func:`score_pairs`, also the right continuations' token ids and teacher-forced argmax
    tokens (:class:`Continuations`, one entry per pair) and the next-token distributions of the
    prompts asked for (empty where not asked, or where built by hand).
    """

    log_p_right: Float[Tensor, " pair"]
    log_p_wrong: Float[Tensor, " pair"]
    right_ids: tuple[tuple[int, ...], ...] | None = None
    right_argmax: tuple[tuple[int, ...], ...] | None = None
    next_token: dict[str, Float[Tensor, " vocab"]] = field(default_factory=dict)

    @property
    def p_right(self) -> Float[Tensor, " pair"]:
        """Geometric-mean token probability of the right continuation."""
        return self.log_p_right.exp()

    @property
    def p_wrong(self) -> Float[Tensor, " pair"]:
        return self.log_p_wrong.exp()

    @property
    def correct(self) -> Bool[Tensor, " pair"]:
        """True where P(right) > P(wrong), strictly (a tie is wrong)."""
        return self.log_p_right > self.log_p_wrong

    def __len__(self) -> int:
        return int(self.log_p_right.shape[0])


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass(frozen=True)
class Continuations:
    """What :func:`score_continuations` reads from its forward passes, one entry per (prompt, target).

    ``log_probs``: mean log-probability per target token of ``f"{prompt} {target}"``.
    ``target_ids`` / ``argmax_ids``: the target's token ids and, teacher-forced (the prompt and the
    target's earlier tokens given), the argmax of the logits at each position that predicts one
    of them. ``next_token``: for each prompt asked for, the log-softmax over the vocabulary at the
    prompt's last position (float32, on the CPU): the next-token distribution after the prompt.
    """

    log_probs: Float[Tensor, " row"]
    target_ids: tuple[tuple[int, ...], ...]
    argmax_ids: tuple[tuple[int, ...], ...]
    next_token: dict[str, Float[Tensor, " vocab"]]


@torch.no_grad()
def score_continuations(
    model, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32,
    next_token: Collection[str] = (),
) -> Continuations:
    """Score each ``f"{prompt} {target}"`` (see :class:`Continuations`) in shared batches.

    Each distinct prompt is run once per multi-token target (at least once); single-token
    targets are read from the last prompt position of one of the prompt's rows, which is the
    same number as a row of their own (causal attention), at a fraction of the cost. Rows are
    sorted by length before batching (less padding); right padding and the attention mask make
    every result independent of its batch. ``next_token`` prompts must be among ``prompts``;
    their distributions come from those same rows (no extra forward pass).
    """
    check_batch_size(batch_size)
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; they pair one to one")
    missing = set(next_token) - set(prompts)
    if missing:
        raise ValueError(f"next_token prompts must be among the scored prompts; not there: {sorted(missing)[:3]}")
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for prompt, target in zip(prompts, targets):
        by_prompt.setdefault(prompt, {})[target] = tokens.continuation_ids(model, prompt, target)[1]
    rows: list[tuple[str, str]] = []
    for prompt, ids in by_prompt.items():
        multi = [t for t, t_ids in ids.items() if len(t_ids) > 1]
        rows += [(prompt, t) for t in multi] or [(prompt, next(iter(ids)))]
    rows.sort(key=lambda pt: (-len(pt[0]) - len(pt[1]), pt))
    found: dict[tuple[str, str], float] = {}
    argmax: dict[tuple[str, str], tuple[int, ...]] = {}
    dists: dict[str, Tensor] = {}
    read: set[str] = set()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = tokens.batch_with_targets(model, [p for p, _ in chunk], [t for _, t in chunk])
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        own = tokens.target_log_probs(logits, batch).tolist()
        for i, (prompt, target) in enumerate(chunk):
            found[(prompt, target)] = own[i]
            first = int(batch.last_prompt_index[i])
            argmax[(prompt, target)] = tuple(
                logits[i, first : first + int(batch.target_lengths[i])].argmax(-1).tolist())
            if prompt in read:
                continue
            read.add(prompt)
            last = logits[i, first].float().log_softmax(-1)
            if prompt in next_token:
                dists[prompt] = last.detach().cpu()
            best = int(logits[i, first].argmax())
            for other, t_ids in by_prompt[prompt].items():
                if len(t_ids) == 1 and other != target:
                    found[(prompt, other)] = float(last[t_ids[0]])
                    argmax[(prompt, other)] = (best,)
    keys = list(zip(prompts, targets))
    return Continuations(
        torch.tensor([found[key] for key in keys], dtype=torch.float64),
        tuple(tuple(by_prompt[p][t]) for p, t in keys), tuple(argmax[key] for key in keys), dists,
    )


def continuation_log_probs(
    model, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> Float[Tensor, " row"]:
    """Mean log-probability per target token of each ``f"{prompt} {target}"``
    (:func:`score_continuations`' ``log_probs``)."""
    return score_continuations(model, prompts, targets, batch_size=batch_size).log_probs


def score_pairs(
    model, prompts: Sequence[str], rights: Sequence[str], wrongs: Sequence[str], *, batch_size: int = 32,
    next_token: Collection[str] = (),
) -> PairScores:
    """Score prompt pairs with all right and wrong continuations in shared batches
    (:func:`score_continuations`; ``next_token``: prompts whose next-token distribution to keep)."""
    if not len(prompts) == len(rights) == len(wrongs):
        raise ValueError(
            f"prompts, rights and wrongs must have the same length, got {len(prompts)}, {len(rights)}, {len(wrongs)}"
        )
    n = len(prompts)
    scored = score_continuations(model, list(prompts) * 2, list(rights) + list(wrongs), batch_size=batch_size,
                                 next_token=next_token)
    return PairScores(scored.log_probs[:n], scored.log_probs[n:], scored.target_ids[:n], scored.argmax_ids[:n],
                      scored.next_token)
