"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer").

Following the authors' code (``memit/memit_main.py``, ``compute_z.py``, ``compute_ks.py``):

1. For each request, a target residual ``z_i = h_i + delta_i`` at the output of the last
   layer ``L`` of the range (``blocks.L.hook_out``, subject's last token, bare prompt) is
   optimised by :func:`~attention_drift.editing.optimize.optimize_values` (:func:`solve_values`:
   up to :data:`VALUE_BATCH` requests share one batch, each with its own loss and result).
2. For each layer ``l`` of the range in increasing order, on the model already holding the
   updates of the layers before it: keys ``K`` (``blocks.l.mlp.hook_post`` at the subject's
   last token; per request the mean of the bare-prompt key and the mean over the prefixed
   ones), residuals ``R = (Z - H_L) / (number of layers left, l included)`` with ``H_L``
   the current output of layer ``L``, and the batched least-squares update
   ``Delta = R K^T (lambda C + K K^T)^-1`` (float64) added to the MLP output projection.

:func:`spread_updates` is shared with PMET, which differs in the residual's site and
divisor.

With an extra loss term that names ``null_prompts(request)`` (SADR's ``key_nulls``), each layer's
update is the least-squares one under the hard constraint that the subject's keys in those prompts
(at that layer, on the model as it then is) get no change, and those in ``keep_prompts(request)``
(``key_keeps``) the change they would get without the constraint (:func:`least_squares_update`):
ROME's :func:`~attention_drift.editing.rome.null_direction` for a batched update.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.editing.config import MEMITConfig, PMETConfig
from attention_drift.editing.optimize import (
    ExtraLoss,
    Objective,
    OptimizationTrace,
    optimize_values,
    optimize_values_many,
    subject_activations,
    template_rows,
)
from attention_drift.editing.rome import constraint_keys
from attention_drift.editing.stats import key_second_moments
from attention_drift.editing.templates import context_templates
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight
from attention_drift.core.hooks import act_name, mlp_weight_name


@dataclass(frozen=True)
class Prepared:
    """What MEMIT and PMET need before any weight changes.

    Args:
        groups: the context template groups (``[["{}"], group per (length, count)]``).
        covs: ``{layer: C}``, the key second moment of every edited layer.
    """

    groups: tuple[tuple[str, ...], ...]
    covs: dict[int, Float[Tensor, "d_mlp d_mlp"]]


def prepare(model, config: MEMITConfig | PMETConfig, *, progress: bool = True) -> Prepared:
    """The context template groups and the key second moments of ``config.layers``."""
    groups = context_templates(model, config.context_templates, config.template_seed)
    covs = key_second_moments(model, config.layers, config.stats, progress=progress)
    return Prepared(tuple(tuple(g) for g in groups), covs)


def grouped_keys_and_outputs(
    model, requests: Sequence[Rewrite], groups: Sequence[Sequence[str]], layer: int, out_hook: str
) -> tuple[Tensor, Tensor]:
    """(keys ``[n, d_mlp]``, ``out_hook`` at the bare prompt ``[n, d]``) of each request.

    A request's key is the mean over template groups of the mean key within each group, as
    MEMIT's ``compute_ks``; the bare prompt is the first template of the first group.
    """
    flat = [t for group in groups for t in group]
    prompts, positions = [], []
    for request in requests:
        p, pos = template_rows(model, request, flat)
        prompts += p
        positions += pos
    key_hook = act_name("mlp_post", layer)
    acts = subject_activations(model, prompts, positions, [key_hook, out_hook])
    keys = acts[key_hook].double().reshape(len(requests), len(flat), -1)
    bounds, start = [], 0
    for group in groups:
        bounds.append((start, start + len(group)))
        start += len(group)
    grouped = torch.stack([keys[:, a:b].mean(1) for a, b in bounds], 1).mean(1)
    outputs = acts[out_hook].double().reshape(len(requests), len(flat), -1)[:, 0]
    return grouped, outputs


def least_squares_update(
    model, layer: int, keys: Float[Tensor, "n d_mlp"], residuals: Float[Tensor, "n d_model"], cov: Tensor,
    mom2_update_weight: float, null_keys: Float[Tensor, "m d_mlp"] | None = None,
    keep_keys: Float[Tensor, "p d_mlp"] | None = None,
) -> Tensor:
    """``R K^T A^-1`` with ``A = lambda C + K K^T``, in the parameter's layout. With ``null_keys`` ``N``
    it is the least-squares update under the constraint ``Delta N = 0`` (and, with ``keep_keys`` ``P``,
    ``Delta P`` held to the unconstrained update's): ``Delta - [Delta N, 0] (B^T A^-1 B)^+ B^T A^-1``
    with ``B = [N, P]`` (pseudo-inverse: a key that repeats another constraint adds nothing)."""
    k = keys.T.double()  # [d_mlp, n]
    a = mom2_update_weight * cov.double() + k @ k.T
    upd = residuals.T.double() @ torch.linalg.solve(a, k).T  # [d_model, d_mlp]
    if null_keys is not None and len(null_keys):
        n = null_keys.T.double()  # [d_mlp, m]
        b = n if keep_keys is None else torch.cat([n, keep_keys.T.double()], 1)
        miss = torch.cat([upd @ n, upd.new_zeros(upd.shape[0], b.shape[1] - n.shape[1])], 1)
        spread = torch.linalg.solve(a, b)
        upd = upd - miss @ torch.linalg.pinv(b.T @ spread) @ spread.T
    return upd.T.contiguous() if mlp_out_is_conv1d(model, layer) else upd


def spread_updates(
    model,
    requests: Sequence[Rewrite],
    layers: Sequence[int],
    targets: Tensor,
    out_hook: str,
    divisor: Callable[[int], float],
    groups: Sequence[Sequence[str]],
    covs: dict[int, Tensor],
    mom2_update_weight: float,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> None:
    """Write ``targets`` (``[n, d]``, values of ``out_hook``) into the MLPs of ``layers``, in order.

    At the i-th layer the residual ``targets - current out_hook`` is divided by
    ``divisor(number of layers left)``. Where ``extra_losses`` give key nulls / keeps
    (:func:`~attention_drift.editing.rome.constraint_keys`), each layer's update is constrained at those
    keys, measured at that layer.
    """
    for i, layer in enumerate(layers):
        keys, current = grouped_keys_and_outputs(model, requests, groups, layer, out_hook)
        residuals = (targets.double() - current) / divisor(len(layers) - i)
        constraints = [constraint_keys(model, extra_losses, r, act_name("mlp_post", layer)) for r in requests]
        null = [n for n, _ in constraints if n is not None]
        keep = [k for _, k in constraints if k is not None]
        upd = least_squares_update(model, layer, keys, residuals, covs[layer], mom2_update_weight,
                                   torch.cat(null) if null else None, torch.cat(keep) if keep else None)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))


def optimize_targets(model, requests: Sequence[Rewrite], config, groups, extra_losses: Sequence[ExtraLoss] = ()):
    """MEMIT's value optimisation, shared by the editors built on it (AlphaEdit, EMMET): each
    request's target residual at the output of ``config.layers[-1]``; returns the site's hook
    name and the solutions (:func:`solve_values`)."""
    z_layer = config.layers[-1]
    site = act_name("resid_post", z_layer)
    return site, solve_values(model, requests, config, groups, [site], Objective.of(config), extra_losses)


VALUE_BATCH = 8
"""Most requests whose value optimisations share one batch (:func:`solve_values`): a step's
activations grow with the rows, about 12 per request."""


def solve_values(model, requests: Sequence[Rewrite], config, groups, sites: Sequence[str], objective: Objective,
                 extra_losses: Sequence[ExtraLoss] = ()) -> list:
    """Each request's value optimisation at ``config.layers[-1]``: :data:`VALUE_BATCH` requests at a
    time in one batch (:func:`~attention_drift.editing.optimize.optimize_values_many`), or one at a
    time (:func:`~attention_drift.editing.optimize.optimize_values`) when extra loss terms read
    each request's rows."""
    flat = [t for group in groups for t in group]
    kw = dict(sites=list(sites), layer=config.layers[-1], objective=objective, loss_layer=config.v_loss_layer)
    if extra_losses:
        return [optimize_values(model, r, flat, extra_losses=extra_losses, **kw) for r in requests]
    return [s for i in range(0, len(requests), VALUE_BATCH)
            for s in optimize_values_many(model, requests[i:i + VALUE_BATCH], flat, **kw)]


def execute(
    model,
    requests: Sequence[Rewrite],
    config: MEMITConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Optimise each request's target residual, then spread the batch over ``config.layers``."""
    groups, covs = prepared.groups, prepared.covs
    site, solutions = optimize_targets(model, requests, config, groups, extra_losses)
    targets = torch.stack([s.target[site] for s in solutions])
    spread_updates(model, requests, config.layers, targets, site, float, groups, covs,
                   config.mom2_update_weight, apply, extra_losses)
    return [s.trace for s in solutions]
