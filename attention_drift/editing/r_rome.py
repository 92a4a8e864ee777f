"""r-ROME (Gupta, Baskaran, Anumanchipalli 2024, "Rebuilding ROME: Resolving Model Collapse
during Sequential Model Editing").

ROME (:mod:`~attention_drift.editing.rome`) with one key throughout the rank-one update. The
original ROME code builds the update direction ``u = C^-1 k*`` from ``k*``, the key averaged
over the context templates (bare prompt and prefixed ones), but its residual and denominator,
``(v* - W k - b) / (u^T k)``, from ``k``, the bare prompt's key alone. The paper shows that this
asymmetry is what makes the "disabling edits" (an update of huge norm that collapses the model,
and, in sequential editing, collapse after a few hundred edits): ``u^T k`` can be close to zero
while ``u^T k*`` is not. r-ROME uses the same key in all three places, so the edited layer maps
that key to the value the optimisation found:

* ``keys="prefixes"`` (r-ROME, the authors' default, ``enable_random_prefix_keys``): ``k*`` the
  key averaged over the context templates, ``u = C^-1 k* / ||C^-1 k*||``,
  ``W <- W + delta u^T / (u^T k*)``, so the edited layer maps ``k*`` to ``W k* + b + delta``;
* ``keys="prompt"`` (the paper's p-ROME, ``enable_prompt_keys``): ``k`` the bare prompt's key
  everywhere, ``u = C^-1 k``, and ``k`` mapped to ``v_init + delta``.

``delta`` is the vector optimised by ROME's objective
(:func:`~attention_drift.editing.optimize.optimize_values`, so SADR / SADR+ plug in as for ROME):
it is added to every template row's own MLP output at the subject's last token, so ``W k + b +
delta`` is the value it was optimised for at any of those keys. Several requests are applied one
after the other, each on the model holding the previous ones.

The authors' repository (``scalable-model-editing/rebuilding-rome``) holds the method twice, and we
follow its dedicated ``r_rome`` module (``r_rome_main.py``, ``compute_ks.py``, run by
``experiments/evaluate_r-rome.py``), not the ``enable_random_prefix_keys`` branch of its
``rome/compute_v.py``:

* ``k*`` is the mean of the template groups' means (``compute_ks``: the bare prompt is a group of
  its own, so it weighs as much as all prefixed templates together), and the context templates
  are the module's, MEMIT's five texts of 10 tokens (``get_context_templates``), so by default
  ``k* = (k_bare + mean of the 5 prefixed keys) / 2``;
* the residual is ``delta`` (``zs - cur_zs``, both read at the bare prompt). The ``rome/`` branch
  instead maps ``k*`` to ``v_init + delta``, ``v_init`` the *bare prompt's* output, so its
  residual carries ``v_init - mean output`` as well. On SmolLM2-135M the bare prompt's key (the
  subject opening the sentence) lies far from the prefixed ones, and that term undid whole edits:
  on the report half that version reached efficacy 93 against ROME's 98, its failures at
  ``P(new) ~ 3e-4`` (``benchmarks/results/editors/README.md``).

Other differences from the authors' code, and why:

* ``k*`` and the mean MLP output come from the value optimisation's own delta-free reference
  pass over the same template rows (the authors run one more forward per template: the same
  numbers, without the extra passes).
* The update is computed in float64 and cast to the weight's dtype.
* Hyper-parameters and presets are ROME's (:class:`ROMEConfig` of the model) except the context
  templates, as the authors' r-ROME takes ROME's hyper-parameter files and MEMIT's templates.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import act_name, mlp_weight_name
from attention_drift.core.models import mlp_out_weight
from attention_drift.editing import rome
from attention_drift.editing.config import (
    MEMIT_TEMPLATES,
    ConfigError,
    StatsConfig,
    _check_common,
    _check_layers,
    _preset,
)
from attention_drift.editing.optimize import ExtraLoss, Objective, OptimizationTrace, optimize_values
from attention_drift.editing.stats import inverse_second_moment
from attention_drift.editing.templates import context_templates

__all__ = ["Prepared", "RROMEConfig", "execute", "prepare", "update_key"]

KEYS = ("prefixes", "prompt")


@dataclass(frozen=True)
class RROMEConfig:
    """r-ROME (Gupta et al. 2024): ROME with the same key in the whole rank-one update.

    Args:
        layer, v_loss_layer, lr, steps, weight_decay, clamp_norm_factor, kl_factor,
            early_stop_loss, mom2_adjustment, stats, template_seed: as
            :class:`~attention_drift.editing.ROMEConfig` (the presets are ROME's).
        context_templates: ``(length, count)`` pairs, as ROME's; the authors' r-ROME uses MEMIT's
            five texts of 10 tokens.
        keys: ``"prefixes"`` (r-ROME): the mean of the template groups' mean keys (the bare prompt
            a group of its own) in ``u``, the residual and the denominator; ``"prompt"`` (the
            paper's p-ROME): the bare prompt's key in all three.
    """

    layer: int
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_templates: tuple[tuple[int, int], ...] = MEMIT_TEMPLATES
    mom2_adjustment: bool = True
    stats: StatsConfig = field(default_factory=StatsConfig)
    template_seed: int = 0
    keys: str = "prefixes"

    method = "r-rome"

    def __post_init__(self):
        _check_common(self, "RROMEConfig")
        if self.keys not in KEYS:
            raise ConfigError(
                f"RROMEConfig.keys must be one of {KEYS}, got {self.keys!r}: 'prefixes' is r-ROME (the key "
                "averaged over the context templates), 'prompt' is p-ROME (the bare prompt's key)"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, model) -> None:
        """Raise a :class:`ConfigError` when the layers do not exist in ``model``."""
        _check_layers(model, self.layers, self.v_loss_layer, "r-ROME")

    @classmethod
    def for_model(cls, model) -> "RROMEConfig":
        """ROME's preset for ``model`` (see :mod:`~attention_drift.editing.config`)."""
        return _preset(model, cls)


@dataclass(frozen=True)
class Prepared(rome.Prepared):
    """ROME's (flat templates, ``C^-1``) and the size of each template group, ``"{}"``'s first."""

    group_sizes: tuple[int, ...] = ()


def prepare(model, config: RROMEConfig, *, progress: bool = True) -> Prepared:
    """The context templates (and their groups) and, with ``mom2_adjustment``, ``C^-1``."""
    groups = [g for g in context_templates(model, config.context_templates, config.template_seed) if g]
    inverse = (inverse_second_moment(model, config.layer, config.stats, progress=progress)
               if config.mom2_adjustment else None)
    return Prepared(tuple(t for g in groups for t in g), inverse, tuple(len(g) for g in groups))


def update_key(keys: Tensor, outputs: Tensor, group_sizes: Sequence[int], which: str) -> tuple[Tensor, Tensor]:
    """``(k, W k + b)``: the key the update uses and the layer's present output for it.

    ``keys`` / ``outputs`` are the MLP keys and outputs at the subject's last token of each
    template row (row 0 the bare prompt), from the delta-free pass; ``group_sizes`` splits the
    rows into the template groups. The output is affine in the key, so the same mean serves both.
    """
    keys, outputs = keys.double(), outputs.double()
    if which == "prompt":
        return keys[0], outputs[0]
    sizes = list(group_sizes)
    return (torch.stack([g.mean(0) for g in keys.split(sizes)]).mean(0),
            torch.stack([g.mean(0) for g in outputs.split(sizes)]).mean(0))


def execute(
    model,
    requests: Sequence[Rewrite],
    config: RROMEConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Edit ``requests`` in turn; ``apply(param_name, delta)`` adds each weight delta."""
    layer = config.layer
    site, key_hook = act_name("mlp_raw", layer), act_name("mlp_post", layer)
    objective = Objective.of(config)
    traces = []
    for request in requests:
        solution = optimize_values(
            model, request, list(prepared.templates), sites=[site], layer=layer, objective=objective,
            loss_layer=config.v_loss_layer, extra_losses=extra_losses, reference_names=[key_hook, site],
        )
        key, current = update_key(solution.reference[key_hook], solution.reference[site], prepared.group_sizes,
                                  config.keys)
        u = prepared.inverse_cov @ key if prepared.inverse_cov is not None else key
        u = u / u.norm()
        value = current + solution.delta[site].double()
        upd = rome.rank_one_update(model, layer, key, u, value, current)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
        traces.append(solution.trace)
    return traces
