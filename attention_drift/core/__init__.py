"""The base layer: models and tokens, hook names, records, run files, the layer runner, scoring of continuations. Imports no other layer."""
