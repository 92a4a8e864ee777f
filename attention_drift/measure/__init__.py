"""Measurement on a model and an edit: evaluation metrics, attention drift, causal patching, the case study. Imports core and editing."""
