"""A hand-made ROME-like edit shared by the drift and patching tests and benchmarks."""

import contextlib

import torch

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.core.models import mlp_out_is_conv1d, mlp_out_weight


@contextlib.contextmanager
def push_subject(model, rewrite: Rewrite, layer: int = 0, scale: float = 20.0):
    """A hand-made ROME-like edit: a rank-one change of ``layer``'s W_out that makes the subject's
    last-token MLP key also write ``scale * (u_new - u_true)`` (mean unembedding rows of each
    target's tokens); restored on exit."""
    weight = mlp_out_weight(model, layer)
    name = f"blocks.{layer}.mlp.hook_post"
    ids = torch.tensor([tokens.encode(model, rewrite.prompt)])
    last = tokens.subject_span(model, rewrite.prompt, rewrite.subject)[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n == name)
    key = cache[name][0, last]
    unembed = model.original_model.get_output_embeddings().weight
    new = tokens.continuation_ids(model, rewrite.prompt, rewrite.target_new)[1]
    true = tokens.continuation_ids(model, rewrite.prompt, rewrite.target_true)[1]
    direction = unembed[new].mean(0) - unembed[true].mean(0)
    delta = scale * torch.outer(direction, key) / (key @ key)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += delta.T if mlp_out_is_conv1d(model) else delta
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)
