"""attention_drift: what a knowledge edit does to a model's attention, and how to stop it.

Data flows load -> edit -> cache -> analyse -> plot:
:func:`load_model`, :func:`load_counterfact` / :func:`load_example`, :func:`edit`,
:func:`evaluate_record`, :mod:`~attention_drift.drift`, :mod:`~attention_drift.patching`,
:mod:`~attention_drift.plots`, :mod:`~attention_drift.viz`.
"""

from attention_drift.data import Record, Rewrite, balanced_subset, distract_prompt, load_counterfact, load_example
from attention_drift.editing import EditResult, MEMITConfig, PMETConfig, ROMEConfig, apply_edit, edit
from attention_drift.evaluate import aggregate, evaluate_record
from attention_drift.models import DEFAULT_MODEL, OFFLINE_MODELS, load_model, tiny_model
from attention_drift.sadr import SADRConfig

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "EditResult",
    "MEMITConfig",
    "PMETConfig",
    "ROMEConfig",
    "Record",
    "Rewrite",
    "SADRConfig",
    "aggregate",
    "apply_edit",
    "balanced_subset",
    "distract_prompt",
    "edit",
    "evaluate_record",
    "load_counterfact",
    "load_example",
    "load_model",
    "tiny_model",
]
