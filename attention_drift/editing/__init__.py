"""Knowledge editing on the TransformerLens bridge: ROME, MEMIT and PMET.

``edit(model, rewrite, method=...)`` edits inside a ``with`` block and restores the weights
exactly on exit; ``apply_edit`` returns an :class:`EditResult` to restore later. Configs
(frozen dataclasses, ``XConfig.for_model(model)`` presets) are in
:mod:`~attention_drift.editing.config`, the covariance statistics in
:mod:`~attention_drift.editing.stats`, the shared value optimisation (and its extra-loss
hook) in :mod:`~attention_drift.editing.optimize`.
"""

from attention_drift.editing.api import METHODS, EditContext, EditResult, apply_edit, check_request, edit
from attention_drift.editing.config import (
    CONFIG_TYPES,
    ConfigError,
    EditError,
    MEMITConfig,
    PMETConfig,
    RequestError,
    ROMEConfig,
    StatsConfig,
)
from attention_drift.editing.optimize import ExtraLoss, Objective, OptimizationTrace, StepInfo
from attention_drift.editing.stats import key_second_moments

__all__ = [
    "CONFIG_TYPES",
    "METHODS",
    "ConfigError",
    "EditContext",
    "EditError",
    "EditResult",
    "ExtraLoss",
    "MEMITConfig",
    "Objective",
    "OptimizationTrace",
    "PMETConfig",
    "RequestError",
    "ROMEConfig",
    "StatsConfig",
    "StepInfo",
    "apply_edit",
    "check_request",
    "edit",
    "key_second_moments",
]

# TEMPORARY until the editor registry lands (branch editing).
from types import SimpleNamespace as _Editor  # noqa: E402

EDITORS = {m: _Editor(name=m, config_type=c) for m, c in CONFIG_TYPES.items()}
