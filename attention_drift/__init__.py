"""attention_drift: what a knowledge edit does to a model's attention, and how to stop it.

Data flows load -> edit -> measure -> report -> view, one subpackage a layer (ARCHITECTURE.md):

* :mod:`attention_drift.core`: models, tokens, hook names, records, run files, the layer runner;
* :mod:`attention_drift.editing`: the editors (ROME, MEMIT, PMET, AlphaEdit, r-ROME, EMMET, FT), SADR, the edit cache;
* :mod:`attention_drift.measure`: evaluation metrics, attention drift, causal patching, case study;
* :mod:`attention_drift.reports`: evaluation / drift / patch reports, statistics;
* :mod:`attention_drift.views`: plotly figures, circuitsvis views, the explorer page;
* :mod:`attention_drift.runs`: variants, run files, sweeps, sequences of edits, where work is placed, the figures.

The names below are imported on first use, so ``import attention_drift`` (and the command
line's ``--help``) does not wait for torch.
"""

import importlib

_EXPORTS = {
    "Record": "core.data", "Rewrite": "core.data", "balanced_subset": "core.data", "distract_prompt": "core.data",
    "load_counterfact": "core.data", "load_dev": "core.data", "load_example": "core.data",
    "AlphaEditConfig": "editing", "EDITORS": "editing", "EditResult": "editing", "MEMITConfig": "editing",
    "PMETConfig": "editing", "ROMEConfig": "editing", "RROMEConfig": "editing", "EMMETConfig": "editing",
    "apply_edit": "editing", "edit": "editing",
    "load_edited": "editing.external", "WeightSwap": "editing.external", "drift_pair": "runs.analysis",
    "aggregate": "measure.evaluate", "evaluate_record": "measure.evaluate",
    "DEFAULT_MODEL": "core.models", "OFFLINE_MODELS": "core.models", "load_model": "core.models",
    "tiny_model": "core.models",
    "SADRConfig": "editing.sadr",
    "AttentionDriftError": "core.errors",
    "Variant": "runs.variants", "SADRSpec": "runs.variants",
    "Placement": "runs.placement", "Executor": "runs.executor",
    "run_sequence": "runs.sequence", "SequenceConfig": "runs.sequence", "MonitorConfig": "measure.monitor",
}

__all__ = sorted(_EXPORTS)

_MODULES = {  # short names for notebooks: ``ad.drift``, ``ad.plots`` ...
    "data": "core.data", "hooks": "core.hooks", "models": "core.models", "editing": "editing",
    "sadr": "editing.sadr", "evaluate": "measure.evaluate", "drift": "measure.drift",
    "patching": "measure.patching", "case_study": "measure.case_study", "report": "reports.evaluation",
    "stats": "reports.stats", "plots": "views.plots", "viz": "views.viz", "explorer": "views.explorer",
    "runs": "runs", "analysis": "runs.analysis", "figures": "runs.figures", "sweep": "runs.sweep",
    "variants": "runs.variants", "sequence": "runs.sequence", "monitor": "measure.monitor",
}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"attention_drift.{_MODULES[name]}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attention_drift' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"attention_drift.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))
