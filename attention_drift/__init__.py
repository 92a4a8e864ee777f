"""attention_drift: what a knowledge edit does to a model's attention, and how to stop it.

Data flows load -> edit -> cache -> analyse -> report / plot:
:func:`load_model`, :func:`load_counterfact` / :func:`load_dev` / :func:`load_example`,
:func:`edit`, :func:`evaluate_record`, :mod:`~attention_drift.drift`,
:mod:`~attention_drift.patching`, :mod:`~attention_drift.report`, :mod:`~attention_drift.plots`,
:mod:`~attention_drift.viz`.

The names below are imported on first use, so ``import attention_drift`` (and the command
line's ``--help``) does not wait for torch.
"""

import importlib

_EXPORTS = {
    "Record": "data", "Rewrite": "data", "balanced_subset": "data", "distract_prompt": "data",
    "load_counterfact": "data", "load_dev": "data", "load_example": "data",
    "EDITORS": "editing", "EditResult": "editing", "MEMITConfig": "editing", "PMETConfig": "editing",
    "ROMEConfig": "editing", "apply_edit": "editing", "edit": "editing",
    "aggregate": "evaluate", "evaluate_record": "evaluate",
    "DEFAULT_MODEL": "models", "OFFLINE_MODELS": "models", "load_model": "models", "tiny_model": "models",
    "SADRConfig": "sadr",
    "AttentionDriftError": "errors",
    "Variant": "variants", "SADRSpec": "variants",
}

__all__ = sorted(_EXPORTS)


_MODULES = {"analysis", "case_study", "data", "drift", "editing", "evaluate", "explorer", "figures", "hooks", "models",
            "patching", "plots", "report", "runs", "sadr", "stats", "sweep", "variants", "viz"}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"attention_drift.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attention_drift' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"attention_drift.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _MODULES)
