"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Per request, at the edited layer L (following the authors' code, ``rome/compute_u.py``,
``compute_v.py``, ``rome_main.py``):

* key ``k*``: mean over the context templates of the MLP key (``blocks.L.mlp.hook_post``)
  at the subject's last token; ``u = C^-1 k*`` (``C = E[k k^T]``, see
  :mod:`~attention_drift.editing.stats`) normalised to unit length;
* value ``v* = v_init + delta``, ``delta`` optimised at the MLP output
  (``blocks.L.mlp.hook_out``) by :func:`~attention_drift.editing.optimize.optimize_values`;
  ``v_init`` is the MLP output at the subject's last token of the bare prompt;
* update ``W <- W + (v* - W k - b) u^T / (u^T k)`` with ``k`` the bare prompt's key, so the
  edited layer maps ``k`` to ``v*`` exactly. (The paper writes the denominator and the
  residual with ``k*``; the authors' code, which produced the published numbers and which
  the over-attention paper ran, uses the bare prompt's key there; we follow the code.)

With an extra loss term that names ``null_prompts(request)`` (SADR's ``key_nulls``), ``u`` is first
moved the least in the ``C`` metric so that the keys of the subject in those prompts get no change
while every rewriting key (the bare prompt's and each template's), and those of ``keep_prompts(request)``
(``key_keeps``), keeps its change (:func:`null_direction`).

Several requests are applied one after the other, each computed on the model already
holding the previous ones (as ``apply_rome_to_model``).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.editing.config import ROMEConfig
from attention_drift.editing.optimize import (ExtraLoss, Objective, OptimizationTrace, optimize_values,
                                              subject_activations, subject_last_index, term_prompts)
from attention_drift.editing.stats import inverse_second_moment
from attention_drift.editing.templates import context_templates
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight
from attention_drift.core.hooks import act_name, mlp_weight_name


def objective(config: ROMEConfig) -> Objective:
    return Objective.of(config)


def rank_one_update(model, layer: int, key: Tensor, u: Tensor, value: Tensor, current: Tensor) -> Tensor:
    """The ROME weight delta, in the layout of the parameter: maps ``key`` to ``value``.

    ``current`` is the layer's present output for ``key`` (``W key + b``); ``u`` the update
    direction (``C^-1 k*``, any scale).
    """
    right = (value - current) / torch.dot(key, u)
    upd = torch.outer(right, u)  # [d_model, d_mlp]
    return upd.T.contiguous() if mlp_out_is_conv1d(model, layer) else upd


def null_direction(
    u: Float[Tensor, " d_mlp"], metric_inverse: Float[Tensor, "d_mlp d_mlp"] | None,
    keep: Float[Tensor, "k d_mlp"], null: Float[Tensor, "n d_mlp"],
) -> Float[Tensor, " d_mlp"]:
    """``u`` moved the least in the metric ``C`` (given as ``C^-1``; None: Euclidean) so that
    ``u' . k = u . k`` for each ``keep`` key and ``u' . k = 0`` for each ``null`` key:
    ``u' = u - C^-1 A (A^T C^-1 A)^+ (A^T u - t)``, with ``A`` the keys as columns and ``t`` the
    targets (pseudo-inverse: a null key that duplicates another constraint adds nothing)."""
    inverse = metric_inverse if metric_inverse is not None else torch.eye(len(u), dtype=u.dtype, device=u.device)
    keys = torch.cat([keep, null]).to(u.dtype)
    target = torch.cat([keep.to(u.dtype) @ u, torch.zeros(len(null), dtype=u.dtype, device=u.device)])
    spread = inverse @ keys.T
    return u - spread @ torch.linalg.pinv(keys @ spread) @ (keys @ u - target)


def subject_keys(model, prompts: Sequence[str], subject: str, key_hook: str) -> Float[Tensor, "n d_mlp"]:
    """The key (``key_hook``) at the last token of the last occurrence of ``subject`` in each prompt."""
    positions = [subject_last_index(model, p, subject, p.rfind(subject)) for p in prompts]
    return subject_activations(model, prompts, positions, [key_hook])[key_hook].double()


def constraint_keys(
    model, extra_losses: Sequence[ExtraLoss], request: Rewrite, key_hook: str,
) -> tuple[Float[Tensor, "n d_mlp"] | None, Float[Tensor, "m d_mlp"] | None]:
    """(null keys, keep keys) of ``request`` at ``key_hook``: the subject's keys in the prompts the extra
    terms give through ``null_prompts`` / ``keep_prompts`` (SADR's ``key_nulls`` / ``key_keeps``); None
    where they give none (keeps act only beside nulls)."""
    null = term_prompts(extra_losses, request, "null_prompts")
    if not null:
        return None, None
    keep = term_prompts(extra_losses, request, "keep_prompts")
    return (subject_keys(model, null, request.subject, key_hook),
            subject_keys(model, keep, request.subject, key_hook) if keep else None)


def update_direction(
    inverse_cov: Float[Tensor, "d_mlp d_mlp"] | None, keys: Float[Tensor, "row d_mlp"],
    null_keys: Float[Tensor, "n d_mlp"] | None = None, keep_keys: Float[Tensor, "m d_mlp"] | None = None,
) -> Float[Tensor, " d_mlp"]:
    """ROME's ``u``: ``C^-1 k*`` (``k*`` the mean of the rewriting ``keys``, bare prompt first; ``k*``
    itself without the covariance) at unit length; with ``null_keys``, then moved by
    :func:`null_direction` so that those get no change while every rewriting key, and each of
    ``keep_keys``, keeps its own."""
    u = inverse_cov @ keys.mean(0) if inverse_cov is not None else keys.mean(0)
    u = u / u.norm()
    if null_keys is None:
        return u
    keep = keys if keep_keys is None else torch.cat([keys, keep_keys.to(keys.dtype)])
    return null_direction(u, inverse_cov, keep, null_keys)


@dataclass(frozen=True)
class Prepared:
    """What ROME needs before any weight changes.

    Args:
        templates: the context templates, flat (``"{}"`` first).
        inverse_cov: ``C^-1`` (float64) of the edited layer's keys; None without the
            covariance adjustment.
    """

    templates: tuple[str, ...]
    inverse_cov: Float[Tensor, "d_mlp d_mlp"] | None


def prepare(model, config: ROMEConfig, *, progress: bool = True) -> Prepared:
    """The context templates and, with ``mom2_adjustment``, the inverse key covariance."""
    groups = context_templates(model, config.context_templates, config.template_seed)
    inverse = inverse_second_moment(model, config.layer, config.stats, progress=progress) if config.mom2_adjustment else None
    return Prepared(tuple(t for g in groups for t in g), inverse)


def execute(
    model,
    requests: Sequence[Rewrite],
    config: ROMEConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Edit ``requests`` in turn; ``apply(param_name, delta)`` adds each weight delta."""
    layer = config.layer
    site, key_hook = act_name("mlp_raw", layer), act_name("mlp_post", layer)
    traces = []
    for request in requests:
        solution = optimize_values(
            model, request, list(prepared.templates), sites=[site], layer=layer, objective=objective(config),
            loss_layer=config.v_loss_layer, extra_losses=extra_losses, reference_names=[key_hook],
        )
        keys = solution.reference[key_hook].double()
        u = update_direction(prepared.inverse_cov, keys, *constraint_keys(model, extra_losses, request, key_hook))
        upd = rank_one_update(
            model, layer, keys[0], u, solution.target[site].double(), solution.init[site].double()
        )
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
        traces.append(solution.trace)
    return traces
