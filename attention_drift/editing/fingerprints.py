"""Fingerprints of a model that the editing caches (statistics, corpora, templates, edits) are keyed by."""

import hashlib
import json
from pathlib import Path

from attention_drift.core.models import n_layers


def model_key(model) -> str:
    """A file-system safe name for ``model``: its name plus a fingerprint of its embedding."""
    name = str(getattr(model, "model_name", None) or model.cfg.model_name)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)[:60]
    digest = hashlib.sha1(f"{name}|{tuple(_embedding(model).shape)}|{n_layers(model)}".encode())
    digest.update(_embedding_head(model))
    return f"{safe}-{digest.hexdigest()[:10]}"


def embedding_fingerprint(model) -> str:
    """Like :func:`model_key` without the name: equal for the same weights loaded under any
    name (an alias, a path), different for another checkpoint or another dtype."""
    digest = hashlib.sha1(f"{tuple(_embedding(model).shape)}|{n_layers(model)}".encode())
    digest.update(_embedding_head(model))
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(model) -> str:
    """A digest of the tokenizer's vocabulary, special tokens and BOS rule: token ids mean the
    same text for two models exactly when their fingerprints agree."""
    tokenizer = model.tokenizer
    identity = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "bos": bool(getattr(model.cfg, "default_prepend_bos", False)),
    }
    return hashlib.sha1(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()[:16]


def _embedding(model):
    return model.original_model.get_input_embeddings().weight


def _embedding_head(model) -> bytes:
    return _embedding(model)[:8].detach().float().cpu().numpy().tobytes()
