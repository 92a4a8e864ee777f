"""What identifies an edit: the model, the fully resolved configuration, the requests.

:func:`edit_key` hashes a canonical JSON of everything an edit's result depends on besides
the requests: the model (name and embedding fingerprint as the statistics cache has them,
family, sizes, dtype, device type), the method, the editor's config with every default
filled in (statistics, context-template spec and seed included), the SADR config with its
published weight and steps filled in, and :data:`FORMAT_VERSION`. A changed preset or
protocol default therefore changes the key. Extra loss terms are not part of it: an edit
made with them has no key.
"""

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import torch

from attention_drift.core.data import Rewrite
from attention_drift.editing.config import ConfigError
from attention_drift.editing.registry import resolve_edit
from attention_drift.editing.fingerprints import model_key
from attention_drift.core.models import model_family, n_layers

FORMAT_VERSION = 1
"""Bump when an editor's computation or the saved format changes (e.g. when the frozen
reference of ``tests/test_reference_editing.py`` is regenerated): every stored edit then misses."""


def model_identity(model) -> dict:
    """Name, family, sizes, dtype and device type of ``model`` (JSON-ready)."""
    weight = model.original_model.get_input_embeddings().weight
    return {
        "model_key": model_key(model),
        "family": model_family(model),
        "n_layers": n_layers(model),
        "d_model": int(model.cfg.d_model),
        "d_mlp": int(model.cfg.d_mlp),
        "n_heads": int(model.cfg.n_heads),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "device": weight.device.type,
    }


def plain(value, where: str = "config"):
    """``value`` as JSON-ready data: dataclasses become ``{"type": ..., field: ...}``, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"type": type(value).__qualname__}
        for f in dataclasses.fields(value):
            out[f.name] = plain(getattr(value, f.name), f"{where}.{f.name}")
        corpus_key = getattr(value, "corpus_key", None)
        if isinstance(corpus_key, str):  # StatsConfig: names local files by size and mtime too
            out["corpus_key"] = corpus_key
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigError(f"cannot key the edit: {where} is a {type(value).__name__}; configs must hold plain values")


def describe_edit(model, method: str = "rome", config=None, sadr=None) -> dict:
    """The canonical description :func:`edit_key` hashes (defaults resolved as an edit would)."""
    editor, config, sadr = resolve_edit(model, method, config, sadr)
    return describe_resolved(model, editor.name, config, sadr)


LATER_FIELDS = {"clamp_scale": 1.0, "guard_weight": 0.0, "guard_margin": 1.0, "verify": False,
                "distract_forms": ["edit"], "guard_mentions": False, "guard_others": False, "output_margin": 0.0,
                "attention_forms": None, "output_forms": None, "key_nulls": [], "key_keeps": [],
                "relation_prompts": [], "relation_forms": [], "relation_weight": 0.0}
"""SADR config fields added after keys were in use, with the value that leaves an edit as it was:
left out of the description at that value, so earlier keys (and run files) stay valid."""


def is_later_default(name: str, value) -> bool:
    """Whether ``value`` of SADR field ``name`` is the :data:`LATER_FIELDS` value (tuples as lists)."""
    return name in LATER_FIELDS and LATER_FIELDS[name] == plain(value)


def describe_resolved(model, method: str, config, sadr) -> dict:
    """:func:`describe_edit` of a method, config and SADR config that
    :func:`~attention_drift.editing.registry.resolve_edit` returned (no resolving again)."""
    sadr_plain = plain(sadr, "sadr")
    if sadr_plain is not None:
        sadr_plain = {k: v for k, v in sadr_plain.items() if not is_later_default(k, v)}
    return {
        "format": FORMAT_VERSION,
        "model": model_identity(model),
        "method": method,
        "config": plain(config),
        "sadr": sadr_plain,
    }


def digest(data) -> str:
    """sha256 of the canonical JSON of ``data``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def edit_key(model, method: str = "rome", config=None, sadr=None) -> str:
    """sha256 hex of the resolved configuration of an edit of ``model`` (see the module docstring)."""
    return digest(describe_edit(model, method, config, sadr))


def resolved_key(model, method: str, config, sadr) -> str:
    """:func:`edit_key` of an already resolved edit (see :func:`describe_resolved`)."""
    return digest(describe_resolved(model, method, config, sadr))


def requests_key(requests: Sequence[Rewrite]) -> str:
    """sha256 hex of the requests (every field, in order)."""
    return digest([dataclasses.asdict(r) for r in requests])


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 hex of the exact bytes (and names, shapes, dtypes) of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
