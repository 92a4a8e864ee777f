"""Canonical hook names: the one place a TransformerLens hook name is spelled.

As TransformerLens's ``get_act_name``: ``act_name("pattern", 3)`` ->
``"blocks.3.attn.hook_pattern"``. Every module builds hook names here, so a name is never
written by hand and two spellings of one activation cannot drift apart.

Kinds (``blocks.L.`` + the suffix):

==============  ========================  =================================================
kind            suffix                    what it is
==============  ========================  =================================================
``pattern``     ``attn.hook_pattern``     attention probabilities ``[batch, head, q, k]``
``z``           ``attn.hook_z``           per-head outputs before the output projection
``attn_out``    ``hook_attn_out``         attention output as added to the residual stream
``attn_raw``    ``attn.hook_out``         the attention module's output (PMET's site)
``mlp_post``    ``mlp.hook_post``         MLP key: input of the output projection (ROME's ``k``)
``mlp_out``     ``hook_mlp_out``          MLP output as added to the residual stream
``mlp_raw``     ``mlp.hook_out``          the output projection's output (ROME's ``v``)
``resid_pre``   ``hook_resid_pre``        residual stream entering the block
``resid_post``  ``hook_resid_post``       residual stream leaving the block
``rot_k``       ``attn.hook_rot_k``       rotary keys (cached-prefix value optimisation)
``v``           ``attn.v.hook_out``       values (cached-prefix value optimisation)
==============  ========================  =================================================

``attn_out`` / ``attn_raw`` and ``mlp_out`` / ``mlp_raw`` differ on models with norms after
the attention or MLP (Gemma 2/3: ``hook_mlp_out`` is after the post-FFN norm); on
Llama-style and GPT-2 models they are the same tensor.
"""

import re

OUTPUT_LOG_PROBS = "output.log_probs"
"""Not a hook: the key under which the value optimisation hands extra loss terms the
next-token log-probabilities of the rows they ask for (``ExtraLoss.output_rows``)."""

SUFFIXES: dict[str, str] = {
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "attn_raw": "attn.hook_out",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "mlp_raw": "mlp.hook_out",
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "rot_k": "attn.hook_rot_k",
    "v": "attn.v.hook_out",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def act_name(kind: str, layer: int) -> str:
    """The hook name of activation ``kind`` (a key of :data:`SUFFIXES`) at ``layer``."""
    try:
        suffix = SUFFIXES[kind]
    except KeyError:
        raise KeyError(f"unknown activation kind {kind!r}; choose from {', '.join(SUFFIXES)}") from None
    return f"blocks.{int(layer)}.{suffix}"


def layer_of(name: str) -> int:
    """The block index of a ``blocks.L.…`` hook or parameter name."""
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a per-block name (blocks.L....)")
    return int(match.group(1))


def mlp_weight_name(layer: int) -> str:
    """The name under which edits record the MLP output projection of ``layer``."""
    return f"blocks.{int(layer)}.mlp.out.weight"
