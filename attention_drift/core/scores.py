"""Scores of prompts under one model state: the true answer against the edit's new target."""

from dataclasses import dataclass

from jaxtyping import Bool, Float
from torch import Tensor


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
