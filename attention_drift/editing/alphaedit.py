"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models").

MEMIT (:mod:`~attention_drift.editing.memit`) with every layer's update projected onto the
null space of the preserved knowledge's keys, following the authors' code
(``AlphaEdit/AlphaEdit_main.py``, ``get_project`` in ``experiments/evaluate.py``):

1. Target residuals ``z_i`` at the output of the last layer of the range, by MEMIT's value
   optimisation (:func:`~attention_drift.editing.optimize.optimize_values` with MEMIT's
   objective), so SADR / SADR+ and any other extra loss plug in exactly as for MEMIT.
2. For each layer ``l`` in increasing order, MEMIT's grouped keys ``K1`` and spread residual
   ``R`` (``(Z - current output of the last layer) / layers left``), then
   ``Delta^T = (P (K1 K1^T + K_p K_p^T) + L2 I)^-1 P K1 R^T``, i.e.
   ``Delta = R K1^T P ((K_p K_p^T + K1 K1^T) P + L2 I)^-1`` with ``P = U_hat U_hat^T`` the
   projection onto the eigenvectors of the key second moment ``C`` whose eigenvalues are below
   ``nullspace_threshold`` (:func:`~attention_drift.editing.stats.null_space_projection`).
   ``Delta`` lies in the row space of ``P`` (``Delta = Delta P``), so ``||Delta k||^2 <=
   threshold * ||Delta||^2`` on average over the corpus' keys: the preserved keys' outputs
   change by at most what the threshold allows.
3. ``K_p K_p^T`` sums the keys of earlier edits (sequential editing): :class:`PreviousKeys`,
   passed in as ``apply_edit(..., state=...)`` and handed back as ``EditResult.state`` with
   this edit's keys added. As in the authors' code, those are the keys on the model after all of
   the edit's layers are written: a layer's keys depend only on the layers below it, all written
   when its update is computed, so the keys read for that update are those keys, not read again.

Where this differs from the authors' code, and why:

* ``P`` comes from ``torch.linalg.eigh`` of ``C`` in float64 (they take ``torch.linalg.svd`` of
  the float32 matrix; for a symmetric positive semi-definite matrix the singular values are the
  eigenvalues, so the same directions are kept) and is symmetrised exactly; the solve is float64
  like our MEMIT's. A cleaner projection: ``P^2 = P`` to ~1e-15 instead of ~1e-6.
* The threshold applies to our ``C`` unchanged: the authors' covariance is
  ``SecondMoment.moment()``, the raw sum of ``k k^T`` divided by the token count, i.e. the same
  per-token mean. ``C`` here comes from our statistics corpus (300 sequences sampled from the
  model on the offline presets, not 100000 Wikipedia samples), so the null space is estimated
  from fewer tokens.
* ``P`` is computed once per (model, layer, statistics, threshold) and cached on disk beside the
  statistics (the authors recompute it per run and write one ``null_space_project.pt``).
* The previous keys are a value passed in and returned (:class:`PreviousKeys`), not a tensor the
  editor mutates in place (their ``cache_c``), so an edit stays undoable and replayable bitwise
  and a sequence of edits can be resumed from any point.
* The value optimisation is ours (MEMIT's, :mod:`~attention_drift.editing.optimize`), with its
  presets: the authors' AlphaEdit files use their MEMIT values too, except Llama3-8B's.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import mlp_weight_name
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight
from attention_drift.editing.config import AlphaEditConfig, EditError
from attention_drift.editing.memit import grouped_keys_and_outputs, optimize_targets
from attention_drift.editing.optimize import ExtraLoss, OptimizationTrace
from attention_drift.editing.stats import null_space_projection
from attention_drift.editing.templates import context_templates


@dataclass(frozen=True, eq=False)
class PreviousKeys:
    """The keys of earlier edits, per layer, as AlphaEdit's sequential editing uses them.

    Only their sum of outer products enters the update, so that is what is kept: its size does
    not grow with the number of edits (the authors' ``cache_c``). Do not mutate the tensors:
    :meth:`added` returns a new value.

    Args:
        grams: ``{layer: K_p K_p^T}`` (float64, ``[d_mlp, d_mlp]``), the sum of ``k k^T`` over
            every key written into that layer so far (each request's grouped key, recomputed
            on the model after its edit).
        count: how many requests the keys come from.
    """

    grams: Mapping[int, Float[Tensor, "d_mlp d_mlp"]] = field(default_factory=dict)
    count: int = 0

    def gram(self, layer: int, like: Tensor) -> Tensor | None:
        """``K_p K_p^T`` of ``layer`` as float64 on ``like``'s device; None when no key was written there yet."""
        if layer not in self.grams:
            return None
        return self.grams[layer].to(like.device, torch.float64)

    def added(self, keys: Mapping[int, Float[Tensor, "n d_mlp"]], n_requests: int) -> "PreviousKeys":
        """A new value with ``keys`` (``{layer: [n, d_mlp]}``) of ``n_requests`` more requests added."""
        grams = dict(self.grams)
        for layer, k in keys.items():
            k = k.double()
            gram = k.T @ k
            grams[layer] = gram if layer not in grams else grams[layer].to(gram.device, torch.float64) + gram
        return PreviousKeys(grams, self.count + n_requests)


@dataclass(frozen=True)
class Prepared:
    """What AlphaEdit needs before any weight changes.

    Args:
        groups: the context template groups (as MEMIT's).
        projections: ``{layer: P}`` (float64), the null-space projection of every edited layer.
    """

    groups: tuple[tuple[str, ...], ...]
    projections: dict[int, Float[Tensor, "d_mlp d_mlp"]]


def prepare(model, config: AlphaEditConfig, *, progress: bool = True) -> Prepared:
    """The context template groups and the null-space projections of ``config.layers``."""
    groups = context_templates(model, config.context_templates, config.template_seed)
    projections = {
        layer: null_space_projection(model, layer, config.stats, config.nullspace_threshold, progress=progress)
        for layer in config.layers
    }
    return Prepared(tuple(tuple(g) for g in groups), projections)


def projected_update(
    model, layer: int, keys: Tensor, residuals: Tensor, projection: Tensor, previous_gram: Tensor | None, l2: float
) -> Tensor:
    """``R K^T P ((K_p K_p^T + K K^T) P + L2 I)^-1`` in the parameter's layout (float64).

    ``keys [n, d_mlp]``, ``residuals [n, d_model]``, ``projection`` and ``previous_gram``
    ``[d_mlp, d_mlp]`` (None: no earlier keys); solved as the authors do, for ``Delta^T``.
    """
    k = keys.T.double()  # [d_mlp, n]
    p = projection.double()
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    pk = p @ k
    system = pk @ k.T + l2 * eye  # P K K^T as (P K) K^T: no d_mlp^3 product
    if previous_gram is not None:
        system = system + p @ previous_gram
    upd_t = torch.linalg.solve(system, pk @ residuals.double())  # [d_mlp, d_model]
    return upd_t.contiguous() if mlp_out_is_conv1d(model, layer) else upd_t.T.contiguous()


def execute(
    model,
    requests: Sequence[Rewrite],
    config: AlphaEditConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
    state: PreviousKeys | None = None,
) -> tuple[list[OptimizationTrace], PreviousKeys]:
    """Optimise each request's target residual, write the projected updates into
    ``config.layers`` in order, and return the traces and ``state`` with this edit's keys added."""
    previous = PreviousKeys() if state is None else state
    if not isinstance(previous, PreviousKeys):
        raise EditError(f"AlphaEdit's state must be a PreviousKeys (or None), got {type(previous).__name__}")
    stray = sorted(set(previous.grams) - set(config.layers))
    if stray:
        raise EditError(
            f"the previous keys hold layers {stray} that this AlphaEdit config does not edit ({config.layers}); "
            "continue a sequence of edits with the layers it started with"
        )
    groups = prepared.groups
    site, solutions = optimize_targets(model, requests, config, groups, extra_losses)
    targets = torch.stack([s.target[site] for s in solutions]).double()
    written = {}
    for i, layer in enumerate(config.layers):
        # the keys of ``layer`` are final here: only earlier layers' updates reach them, all applied
        keys, current = grouped_keys_and_outputs(model, requests, groups, layer, site)
        residuals = (targets - current) / (len(config.layers) - i)
        projection = prepared.projections[layer]
        upd = projected_update(model, layer, keys, residuals, projection, previous.gram(layer, projection), config.l2)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
        written[layer] = keys
    return [s.trace for s in solutions], previous.added(written, len(requests))
