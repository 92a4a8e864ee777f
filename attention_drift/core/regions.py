"""Regions of a prompt: which token positions hold the edited subject, the edit sentence, its new
target, the prompt proper and the prediction position.

Drift sums attention over a region's keys; patching resolves a region name to the positions it
patches. Positions are :func:`~attention_drift.core.tokens.encode` positions (BOS counted).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.core.errors import AttentionDriftError

REGIONS = (
    "subject", "subject_last", "prompt_subject", "prompt_subject_last",
    "edit_sentence", "target_new", "prompt", "last",
)

Span = tuple[int, int]


class RegionError(AttentionDriftError):
    """An unknown region name."""


@dataclass(frozen=True)
class Regions:
    """Token spans (inclusive, :func:`~attention_drift.core.tokens.encode` positions) of one prompt.

    Args:
        length: number of tokens of the prompt (BOS included).
        subject: the edited subject's tokens: in a distract prompt the occurrence inside the
            edit sentence (the first one), otherwise the prompt's first occurrence; None if absent.
        prompt_subjects: the subject's occurrences in the prompt proper (after the edit sentence
            in a distract prompt, all of them otherwise).
        edit_sentence: the edit sentence ``f"{prompt} {target_new}."`` when the text starts with it.
        target_new: the new target's tokens inside the edit sentence.
    """

    length: int
    subject: Span | None
    prompt_subjects: tuple[Span, ...]
    edit_sentence: Span | None
    target_new: Span | None

    @classmethod
    def of(cls, model, rewrite: Rewrite, text: str) -> "Regions":
        length = len(tokens.encode(model, text))
        spans = tokens.subject_spans(model, text, rewrite.subject)
        subject = spans[0] if spans else None
        edit_sentence = target_new = None
        prompt_subjects = tuple(spans)
        if text.startswith(rewrite.edit_sentence):
            edit_sentence = tokens.subject_spans(model, text, rewrite.edit_sentence)[0]
            inside = [s for s in tokens.subject_spans(model, text, rewrite.target_new)
                      if edit_sentence[0] <= s[0] and s[1] <= edit_sentence[1]]
            target_new = inside[-1] if inside else None
            prompt_subjects = tuple(s for s in spans if s[0] > edit_sentence[1])
        return cls(length, subject, prompt_subjects, edit_sentence, target_new)

    def positions(self, region: str) -> tuple[int, ...]:
        """Token positions of ``region`` (one of :data:`REGIONS`); empty when the prompt lacks it.

        ``subject_last`` is the edited subject's last token (the paper's strongest factor);
        ``prompt_subject_last`` the last token of each of the prompt's own occurrences;
        ``prompt`` everything after the edit sentence (the whole prompt if there is none);
        ``last`` the prediction position.
        """
        def span(s: Span | None) -> tuple[int, ...]:
            return () if s is None else tuple(range(s[0], s[1] + 1))

        if region == "subject":
            return span(self.subject)
        if region == "subject_last":
            return () if self.subject is None else (self.subject[1],)
        if region == "prompt_subject":
            return tuple(p for s in self.prompt_subjects for p in span(s))
        if region == "prompt_subject_last":
            return tuple(s[1] for s in self.prompt_subjects)
        if region == "edit_sentence":
            return span(self.edit_sentence)
        if region == "target_new":
            return span(self.target_new)
        if region == "prompt":
            start = 0 if self.edit_sentence is None else self.edit_sentence[1] + 1
            return tuple(range(start, self.length))
        if region == "last":
            return (self.length - 1,)
        raise RegionError(f"unknown region {region!r}; choose from {REGIONS}")

    def mask(self, region: str, n_keys: int, device: torch.device | str = "cpu") -> Bool[Tensor, " key"]:
        """Boolean ``[n_keys]`` mask of ``region``'s positions, on ``device``."""
        mask = torch.zeros(n_keys, dtype=torch.bool, device=device)
        mask[list(self.positions(region))] = True
        return mask
