"""PMET (Li et al. 2024, "PMET: Precise Model Editing in a Transformer").

Following the authors' code (``pmet/compute_zs.py``, ``pmet/pmet_main.py``, with the MLP
as the only rewritten module, as in their configurations):

1. For each request, two deltas are optimised jointly at the last layer ``L`` of the
   range, one on the attention output (``blocks.L.attn.hook_out``) and one on the MLP
   output (``blocks.L.mlp.hook_out``), at the subject's last token, with PMET's loss: the
   weight decay and the clamp apply to each delta relative to its own initial value, and
   the NLL factor drops to a tenth while the target is already the argmax everywhere (the
   run stops then once the KL term is <= 0.01). Only the MLP target ``m_i = m_init + delta``
   is used afterwards.
2. For each layer ``l`` of the range, in order: MEMIT's grouped keys, residual
   ``R = (M - current MLP output of layer L at the bare prompt) / sqrt(layers left)`` (the
   square-root spread), and ``Delta = R K^T (K K^T + lambda C)^-1`` added to the MLP output
   projection.

SADR's ``key_nulls`` constrain each layer's update as in MEMIT (:func:`~attention_drift.editing.memit.least_squares_update`).
The preparation (templates, key second moments) is MEMIT's (:func:`prepare`).
"""

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.editing.config import PMETConfig
from attention_drift.editing.memit import Prepared, prepare, solve_values, spread_updates  # noqa: F401 (prepare: PMET's)
from attention_drift.editing.optimize import ExtraLoss, Objective, OptimizationTrace
from attention_drift.core.hooks import act_name


def execute(
    model,
    requests: Sequence[Rewrite],
    config: PMETConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Optimise each request's attention and MLP deltas jointly, then spread the MLP targets."""
    groups, covs = prepared.groups, prepared.covs
    z_layer = config.layers[-1]
    attn_site, mlp_site = act_name("attn_raw", z_layer), act_name("mlp_raw", z_layer)
    objective = Objective.of(config, nll_factor=config.nll_factor, argmax_schedule=True)
    solutions = solve_values(model, requests, config, groups, [attn_site, mlp_site], objective, extra_losses)
    targets = torch.stack([s.target[mlp_site] for s in solutions])
    spread_updates(model, requests, config.layers, targets, mlp_site, math.sqrt, groups, covs,
                   config.mom2_update_weight, apply, extra_losses)
    return [s.trace for s in solutions]
