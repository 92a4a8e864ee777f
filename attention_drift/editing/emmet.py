"""EMMET (Gupta, Sajnani, Anumanchipalli 2024, "A Unified Framework for Model Editing":
Equality-constrained Mass Model Editing algorithm for Transformers).

Batched ROME: where MEMIT (:mod:`~attention_drift.editing.memit`) trades the edited keys off
against the preserved ones (least squares, ``lambda C + K K^T``), EMMET keeps the preserved
keys' outputs as close as possible *subject to* every edited key being mapped exactly to its
target value, ``min ||Delta K_0|| s.t. (W + Delta) K_E = V_E``, whose solution is

    Delta = (V_E - W K_E) (K_E^T C^-1 K_E)^-1 K_E^T C^-1,

ROME's rank-one update for a single request. Following the authors' code
(``emmet/emmet_main.py``, ``compute_ks.py``, ``compute_z.py`` of
scalable-model-editing/unified-model-editing):

1. Target residuals ``z_i`` at the output of the last layer ``L`` of ``config.layers``
   (``blocks.L.hook_out``, subject's last token, bare prompt) by MEMIT's value optimisation
   (:func:`~attention_drift.editing.optimize.optimize_values` with MEMIT's objective), so SADR /
   SADR+ and any other extra loss plug in exactly as for MEMIT.
2. For each layer ``l`` in increasing order, on the model already holding the updates of the
   layers before it: MEMIT's keys ``K_E`` (per request the mean of the bare-prompt key and the
   mean over the prefixed ones), residuals ``R = (Z - current output of L) / layers left``
   (``V_E - W K_E`` of the formula: ``V_E = W K_E + R``), and

       C' = mom2_update_weight * C + update_norm_lambda * I
       D  = K_E^T C'^-1 K_E  (+ emmet_lambda * I when there are two requests or more)
       Delta = R D^-1 K_E^T C'^-1

   in float64, added to the MLP output projection. With one request, or ``emmet_lambda = 0``,
   ``Delta K_E = R`` exactly: the edited layer maps each edited key to its target value.
   ``emmet_lambda`` (the authors' 0.1) keeps ``D`` invertible when keys of a batch are nearly
   parallel, at the price of the equalities holding only approximately;
   ``mom2_update_weight`` scales ``C`` and so only sets how strong that regulariser is (``D``
   scales with ``1 / mom2_update_weight``).

The authors' default edits one layer, the ROME layer (GPT-J 5, GPT-2 XL 17, Llama-2-7B 5); a
range of layers spreads the residual as MEMIT does.

Where this differs from the authors' code, and why:

* ``C'^-1 K_E`` and ``D^-1 (...)`` are linear solves in float64 (they invert ``C`` with
  ``torch.inverse`` and fall back to a pseudo-inverse of ``D`` when it is singular; we fall back
  to the pseudo-inverse too): the same update, better conditioned.
* The covariance statistics are ours (:mod:`~attention_drift.editing.stats`, cached on disk and
  in memory, shared with MEMIT: the same ``C`` per model, layer and statistics config).
* The value optimisation is ours (MEMIT's), with its presets; the objective-value diagnostics of
  the authors' code (``calculate_objective_value``, preservation distances) are not computed.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import mlp_weight_name
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight
from attention_drift.editing.config import (
    MEMIT_TEMPLATES,
    ConfigError,
    StatsConfig,
    _check_common,
    _check_layers,
    _check_range,
    _preset,
)
from attention_drift.editing.memit import Prepared, grouped_keys_and_outputs, optimize_targets
from attention_drift.editing.optimize import ExtraLoss, OptimizationTrace
from attention_drift.editing.stats import key_second_moments
from attention_drift.editing.templates import context_templates

__all__ = ["EMMETConfig", "equality_update", "execute", "prepare"]


@dataclass(frozen=True)
class EMMETConfig:
    """EMMET (Gupta et al. 2024): batched ROME, every edited key mapped exactly to its value.

    Args:
        layers: the edited layers, increasing (the authors: the ROME layer alone); the target
            vectors z are optimised at the residual output of the last one.
        v_loss_layer, lr, steps, weight_decay, clamp_norm_factor, kl_factor, early_stop_loss,
            context_templates, stats, template_seed: as :class:`~attention_drift.editing.MEMITConfig`
            (the value optimisation and the keys are MEMIT's).
        mom2_update_weight: factor of ``C`` (the authors' ``mom2_update_weight``: 1 for GPT-J
            and Llama-2, 1000 for GPT-2 XL); with ``update_norm_lambda = 0`` it only sets the
            strength of ``emmet_lambda`` relative to ``K_E^T C^-1 K_E``.
        emmet_lambda: ``emmet_lambda * I`` added to ``D = K_E^T C^-1 K_E`` for a batch of two
            requests or more (the authors' 0.1 in every file); 0: the equalities hold exactly.
        update_norm_lambda: ``update_norm_lambda * I`` added to ``C`` (the authors' 0).
    """

    layers: tuple[int, ...]
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0
    context_templates: tuple[tuple[int, int], ...] = MEMIT_TEMPLATES
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0

    method = "emmet"

    def __post_init__(self):
        _check_common(self, "EMMETConfig")
        _check_range(self.layers, "EMMETConfig")
        if not self.mom2_update_weight > 0:
            raise ConfigError(f"EMMETConfig.mom2_update_weight must be > 0, got {self.mom2_update_weight}")
        if self.emmet_lambda < 0 or self.update_norm_lambda < 0:
            raise ConfigError(
                f"EMMETConfig.emmet_lambda and update_norm_lambda must be >= 0, got {self.emmet_lambda} and "
                f"{self.update_norm_lambda} (the authors use 0.1 and 0)"
            )

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "EMMET")

    @classmethod
    def for_model(cls, model) -> "EMMETConfig":
        """The preset for ``model`` (see :mod:`~attention_drift.editing.config`)."""
        return _preset(model, cls)


def prepare(model, config: EMMETConfig, *, progress: bool = True) -> Prepared:
    """MEMIT's: the context template groups and the key second moments of ``config.layers``."""
    groups = context_templates(model, config.context_templates, config.template_seed)
    covs = key_second_moments(model, config.layers, config.stats, progress=progress)
    return Prepared(tuple(tuple(g) for g in groups), covs)


def equality_update(
    model, layer: int, keys: Tensor, residuals: Tensor, cov: Tensor, config: EMMETConfig
) -> Tensor:
    """``R D^-1 K^T C'^-1`` in the parameter's layout (``keys [n, d_mlp]``, ``residuals [n, d_model]``)."""
    k = keys.T.double()  # [d_mlp, n]
    c = config.mom2_update_weight * cov.double()
    if config.update_norm_lambda:
        c = c + config.update_norm_lambda * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    c_inv_k = torch.linalg.solve(c, k)  # C'^-1 K  [d_mlp, n]
    d = k.T @ c_inv_k  # [n, n]
    if d.shape[0] > 1:
        d = d + config.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    try:
        adj = torch.linalg.solve(d, c_inv_k.T)  # D^-1 K^T C'^-1  [n, d_mlp]
    except torch.linalg.LinAlgError:  # exactly singular D (repeated keys): as the authors, a pseudo-inverse
        adj = torch.linalg.pinv(d) @ c_inv_k.T
    upd = residuals.T.double() @ adj  # [d_model, d_mlp]
    return upd.T.contiguous() if mlp_out_is_conv1d(model, layer) else upd


def execute(
    model,
    requests: Sequence[Rewrite],
    config: EMMETConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Optimise each request's target residual, then write the batch into ``config.layers``."""
    groups, covs = prepared.groups, prepared.covs
    site, solutions = optimize_targets(model, requests, config, groups, extra_losses)
    targets = torch.stack([s.target[site] for s in solutions]).double()
    for i, layer in enumerate(config.layers):
        keys, current = grouped_keys_and_outputs(model, requests, groups, layer, site)
        residuals = (targets - current) / (len(config.layers) - i)
        upd = equality_update(model, layer, keys, residuals, covs[layer], config)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
    return [s.trace for s in solutions]
