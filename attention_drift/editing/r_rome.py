"""r-ROME (Gupta, Baskaran, Anumanchipalli 2024, "Rebuilding ROME: Resolving Model Collapse
during Sequential Model Editing").

ROME (:mod:`~attention_drift.editing.rome`) with one key throughout the rank-one update. The
original ROME code builds the update direction ``u = C^-1 k*`` from ``k*``, the key averaged
over the context templates (bare prompt and prefixed ones), but its residual and denominator,
``(v* - W k - b) / (u^T k)``, from ``k``, the bare prompt's key alone. The paper shows that this
asymmetry is what makes the "disabling edits" (an update of huge norm that collapses the model,
and, in sequential editing, collapse after a few hundred edits): ``u^T k`` can be close to zero
while ``u^T k*`` is not. r-ROME uses the same key in all three places, so the edited layer maps
that key exactly to ``v*``:

* ``keys="prefixes"`` (r-ROME, the paper's and the authors' default,
  ``enable_random_prefix_keys``): ``k* = mean over the templates of the key``, ``u = C^-1 k* /
  ||C^-1 k*||``, ``W <- W + (v* - (W k* + b)) u^T / (u^T k*)`` with ``W k* + b`` the mean over the
  templates of the MLP output (the projection is affine, so the two are equal);
* ``keys="prompt"`` (the paper's p-ROME, ``enable_prompt_keys``): ``k`` the bare prompt's key
  everywhere, ``u = C^-1 k``.

In both, ``v* = v_init + delta``: ``v_init`` the bare prompt's MLP output at the subject's last
token and ``delta`` optimised by ROME's objective
(:func:`~attention_drift.editing.optimize.optimize_values`, so SADR / SADR+ plug in as for
ROME), and several requests are applied one
after the other, each on the model holding the previous ones.

Where this differs from the authors' code (the r-ROME branch of ``compute_u.py`` /
``compute_v.py``, also in EasyEdit's ``r_rome``), and why:

* ``k*`` and the mean MLP output come from the value optimisation's own delta-free reference
  pass over the same template rows (the authors run one more forward per template after the
  optimisation, on the unchanged weights: the same numbers, without the extra passes).
* The update is computed in float64 and cast to the weight's dtype (the authors' float32 code
  inverts ``C`` in float32).
* Hyper-parameters and presets are ROME's (:class:`ROMEConfig` of the model), as the r-ROME
  files equal the ROME files except for the key flags.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import act_name, mlp_weight_name
from attention_drift.core.models import mlp_out_weight
from attention_drift.editing.config import (
    ROME_TEMPLATES,
    ConfigError,
    StatsConfig,
    _check_common,
    _check_layers,
    _preset,
)
from attention_drift.editing.optimize import ExtraLoss, Objective, OptimizationTrace, optimize_values
from attention_drift.editing.rome import Prepared, rank_one_update
from attention_drift.editing.stats import inverse_second_moment
from attention_drift.editing.templates import context_templates

__all__ = ["RROMEConfig", "execute", "prepare", "update_key"]

KEYS = ("prefixes", "prompt")


@dataclass(frozen=True)
class RROMEConfig:
    """r-ROME (Gupta et al. 2024): ROME with the same key in the whole rank-one update.

    Args:
        layer, v_loss_layer, lr, steps, weight_decay, clamp_norm_factor, kl_factor,
            early_stop_loss, context_templates, mom2_adjustment, stats, template_seed: as
            :class:`~attention_drift.editing.ROMEConfig` (the presets are ROME's).
        keys: ``"prefixes"`` (r-ROME): the key averaged over the context templates, bare prompt
            included, in ``u``, the residual and the denominator; ``"prompt"`` (the paper's
            p-ROME): the bare prompt's key in all three.
    """

    layer: int
    v_loss_layer: int | None = None
    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    context_templates: tuple[tuple[int, int], ...] = ROME_TEMPLATES
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


def prepare(model, config: RROMEConfig, *, progress: bool = True) -> Prepared:
    """ROME's: the context templates and, with ``mom2_adjustment``, the inverse key covariance."""
    groups = context_templates(model, config.context_templates, config.template_seed)
    inverse = (inverse_second_moment(model, config.layer, config.stats, progress=progress)
               if config.mom2_adjustment else None)
    return Prepared(tuple(t for g in groups for t in g), inverse)


def update_key(keys: Tensor, outputs: Tensor, which: str) -> tuple[Tensor, Tensor]:
    """``(k, W k + b)``: the key the update uses and the layer's present output for it.

    ``keys`` / ``outputs`` are the MLP keys and outputs at the subject's last token of each
    template row (row 0 the bare prompt), from the delta-free pass.
    """
    keys, outputs = keys.double(), outputs.double()
    if which == "prompt":
        return keys[0], outputs[0]
    return keys.mean(0), outputs.mean(0)


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
        key, current = update_key(solution.reference[key_hook], solution.reference[site], config.keys)
        u = prepared.inverse_cov @ key if prepared.inverse_cov is not None else key
        u = u / u.norm()
        upd = rank_one_update(model, layer, key, u, solution.target[site].double(), current)
        apply(mlp_weight_name(layer), upd.to(mlp_out_weight(model, layer).dtype))
        traces.append(solution.trace)
    return traces
