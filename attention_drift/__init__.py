"""attention_drift: what a knowledge edit does to a model's attention, and how to stop it."""

from attention_drift.data import Record, Rewrite, load_counterfact, load_example
from attention_drift.models import DEFAULT_MODEL, OFFLINE_MODELS, load_model, tiny_model

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "Record",
    "Rewrite",
    "load_counterfact",
    "load_example",
    "load_model",
    "tiny_model",
]
