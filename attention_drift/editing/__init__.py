"""Knowledge editing on the TransformerLens bridge: ROME, MEMIT, PMET, AlphaEdit, EMMET, r-ROME and FT (FT-L).

``edit(model, rewrite, method=...)`` edits inside a ``with`` block and restores the weights
exactly on exit; ``apply_edit`` returns an :class:`EditResult` to restore, re-apply
(bitwise) and save. The editors are registered in :data:`EDITORS`
(:mod:`~attention_drift.editing.registry`: a new editor is one module and one line there).
Configs (frozen dataclasses, ``XConfig.for_model(model)`` presets) are in
:mod:`~attention_drift.editing.config`, the covariance statistics in
:mod:`~attention_drift.editing.stats`, the shared value optimisation (and its extra-loss
hook) in :mod:`~attention_drift.editing.optimize`; :func:`edit_key` identifies an edit's
resolved configuration and :class:`EditCache` replays stored edits from disk.
"""

from attention_drift.editing.alphaedit import PreviousKeys
from attention_drift.editing.api import EditContext, EditResult, apply_edit, check_request, edit
from attention_drift.editing.cache import EditCache
from attention_drift.editing.emmet import EMMETConfig
from attention_drift.editing.config import (
    AlphaEditConfig,
    ConfigError,
    EditError,
    FTConfig,
    MEMITConfig,
    PMETConfig,
    RequestError,
    ROMEConfig,
    StatsConfig,
)
from attention_drift.editing.identity import edit_key
from attention_drift.editing.r_rome import RROMEConfig
from attention_drift.editing.optimize import ExtraLoss, Objective, OptimizationTrace, StepInfo
from attention_drift.editing.registry import (
    CONFIG_TYPES,
    EDITORS,
    METHODS,
    Editor,
    EditorConfig,
    get_editor,
    register,
    resolve_edit,
    unregister,
)
from attention_drift.editing.stats import key_second_moments

__all__ = [
    "AlphaEditConfig",
    "CONFIG_TYPES",
    "EDITORS",
    "METHODS",
    "ConfigError",
    "EditCache",
    "EditContext",
    "EditError",
    "EditResult",
    "Editor",
    "EditorConfig",
    "EMMETConfig",
    "ExtraLoss",
    "FTConfig",
    "MEMITConfig",
    "Objective",
    "OptimizationTrace",
    "PMETConfig",
    "PreviousKeys",
    "RequestError",
    "RROMEConfig",
    "ROMEConfig",
    "StatsConfig",
    "StepInfo",
    "apply_edit",
    "check_request",
    "edit",
    "edit_key",
    "get_editor",
    "key_second_moments",
    "register",
    "resolve_edit",
    "unregister",
]
