"""Tokenisation used everywhere: one rule for BOS, targets, padding and subject positions.

* BOS: a sequence starts with BOS exactly when the model's own tokenizer adds it by default
  (Gemma does, SmolLM2 does not: prepending one there drops P(" Paris") from 0.70 to 0.30).
  :func:`~attention_drift.core.models.load_model` records that in ``model.cfg.default_prepend_bos``
  (the bridge itself turns BOS-adding on in the tokenizer); :func:`encode` is the only place
  that reads it, so BOS is never added twice and every position index here counts it.
* Targets: the paper scores ``f"{prompt} {target}"``. The target's tokens are those of that
  string after the prompt's tokens, so the leading space is handled by the tokenizer itself
  (GPT-2-style BPE gives ``" Paris"``, SentencePiece gives ``"▁Paris"``) and never switched on
  a model name.
* Padding: right padding, so a prompt's positions are the same batched and alone.
* Device: a :class:`Batch` is built on the model's device (:func:`~attention_drift.core.models.model_device`),
  so it can be handed to the model and combined with its activations as it is.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attention_drift.core.models import model_device


def _bos(model) -> list[int]:
    tokenizer = model.tokenizer
    if getattr(model.cfg, "default_prepend_bos", False) and tokenizer.bos_token_id is not None:
        return [int(tokenizer.bos_token_id)]
    return []


def encode(model, text: str) -> list[int]:
    """Token ids of ``text`` for ``model``, starting with BOS where the model expects one."""
    return _bos(model) + list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def continuation_ids(model, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) such that together they tokenise ``f"{prompt} {target}"``.

    When the joint tokenisation does not start with the prompt's own tokens (a merge across
    the boundary), the target is tokenised on its own with a leading space instead.
    """
    target = target.strip()
    if not target:
        raise ValueError("empty target: a target needs at least one non-space character")
    prompt_ids = encode(model, prompt)
    joint = encode(model, f"{prompt} {target}")
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return prompt_ids, joint[len(prompt_ids):]
    alone = list(model.tokenizer(f" {target}", add_special_tokens=False)["input_ids"])
    return prompt_ids, alone


@dataclass(frozen=True)
class Batch:
    """Right-padded token batch of prompts, optionally each followed by a target.

    ``prompt_lengths[i]`` counts prompt tokens (BOS included); the target of row ``i``
    occupies positions ``prompt_lengths[i] : prompt_lengths[i] + target_lengths[i]`` and is
    predicted by the logits one position earlier. ``target_lengths`` is all zeros for a
    prompt-only batch.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    prompt_lengths: Int[Tensor, " batch"]
    target_lengths: Int[Tensor, " batch"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.prompt_lengths + self.target_lengths

    @property
    def last_prompt_index(self) -> Int[Tensor, " batch"]:
        """Position of each prompt's last token: the one predicting the first target token."""
        return self.prompt_lengths - 1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _stack(rows: list[list[int]], prompt_lengths: list[int], pad: int, device: torch.device) -> Batch:
    if not rows:
        raise ValueError("cannot build a batch from zero prompts")
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    prompt = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    target = torch.tensor([len(r) - p for r, p in zip(rows, prompt_lengths)], dtype=torch.long, device=device)
    return Batch(ids, mask, prompt, target)


def batch_prompts(model, prompts: list[str]) -> Batch:
    """Right-padded batch of prompts alone, on the model's device."""
    rows = [encode(model, p) for p in prompts]
    return _stack(rows, [len(r) for r in rows], _pad_id(model.tokenizer), model_device(model))


def batch_with_targets(model, prompts: list[str], targets: list[str]) -> Batch:
    """Right-padded batch of ``f"{prompt} {target}"`` with the target span of each row, on the
    model's device."""
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; they pair one to one")
    rows, prompt_lengths = [], []
    for prompt, target in zip(prompts, targets):
        p_ids, t_ids = continuation_ids(model, prompt, target)
        rows.append(p_ids + t_ids)
        prompt_lengths.append(len(p_ids))
    return _stack(rows, prompt_lengths, _pad_id(model.tokenizer), model_device(model))


def target_log_probs(logits: Float[Tensor, "batch seq vocab"], batch: Batch) -> Float[Tensor, " batch"]:
    """Mean log-probability per target token of each row (the paper's per-token mean NLL, negated)."""
    log_probs = logits.float().log_softmax(-1)
    b, s = batch.input_ids.shape
    pos = torch.arange(s - 1, device=logits.device)
    in_target = (pos[None] >= batch.prompt_lengths[:, None] - 1) & (
        pos[None] < (batch.lengths - 1)[:, None]
    )
    next_tokens = batch.input_ids[:, 1:]
    token_lp = log_probs[:, :-1].gather(-1, next_tokens[..., None])[..., 0]
    total = (token_lp * in_target).sum(-1)
    return total / batch.target_lengths.clamp(min=1)


def subject_spans(model, text: str, subject: str) -> list[tuple[int, int]]:
    """Token spans ``(first, last)`` (inclusive, in :func:`encode` positions) of each occurrence
    of ``subject`` in ``text``, found through character offsets so any template works."""
    if not subject.strip():
        raise ValueError("empty subject: give the subject's text as it appears in the prompt")
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets, shift = enc["offset_mapping"], len(_bos(model))
    spans, start = [], text.find(subject)
    while start != -1:
        end = start + len(subject)
        hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if hit:
            spans.append((hit[0] + shift, hit[-1] + shift))
        start = text.find(subject, start + 1)
    return spans


def subject_span(model, text: str, subject: str, occurrence: int = -1) -> tuple[int, int]:
    """The ``occurrence``-th (default: last) token span of ``subject`` in ``text``.

    Raises a ValueError naming both strings when the subject is not in the text.
    """
    spans = subject_spans(model, text, subject)
    if not spans:
        raise ValueError(
            f"subject {subject!r} does not occur in {text!r}; the prompt must contain the subject "
            "exactly as written (case and spacing included)"
        )
    return spans[occurrence]


def token_strings(model, ids: list[int] | Int[Tensor, " seq"]) -> list[str]:
    """Each token id decoded on its own (leading spaces kept), for axis labels and attention views."""
    return [model.tokenizer.decode([int(i)]) for i in ids]
