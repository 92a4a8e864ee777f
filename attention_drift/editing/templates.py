"""Context prefixes for the value optimisation: short texts the model writes itself.

ROME, MEMIT and PMET optimise the new value over the rewrite prompt preceded by a few
random prefixes, so that the value works in varied contexts and the key is an average over
them. As in the editors' code (EasyEdit's version, which the paper's official code runs),
each prefix is a text of ``length`` tokens (prompt word included, BOS counted where the model
uses one) generated with top-k 5 sampling from one of ``"The"``, ``"Therefore"``,
``"Because"``, ``"I"``, ``"You"``, braces removed, followed by ``". {}"``.

Generated once per model, spec and seed: kept in memory and on disk beside the model's
statistics (``<cache_root()>/<model_key>/templates/``), so later processes skip the ~3 s of
sampling.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from attention_drift.core import tokens
from attention_drift.editing.fingerprints import model_key
from attention_drift.core.paths import cache_dir, write_atomically
from attention_drift.editing.sampling import sample_tokens

__all__ = ["PROMPT_WORDS", "clear_cache", "context_templates", "sample_tokens", "templates_path"]

PROMPT_WORDS = ("The", "Therefore", "Because", "I", "You")
_CACHE: dict[tuple, list[list[str]]] = {}


def templates_path(model, spec: Sequence[tuple[int, int]], seed: int = 0) -> Path:
    """The disk cache file of the templates of ``model`` for ``spec`` and ``seed``."""
    name = "_".join(f"{length}x{count}" for length, count in spec) or "none"
    return cache_dir("stats") / model_key(model) / "templates" / f"{name}-seed{seed}.json"


def context_templates(model, spec: Sequence[tuple[int, int]], seed: int = 0) -> list[list[str]]:
    """Template groups: ``[["{}"], group for each (length, count) of spec]``.

    A group holds ``count`` templates, spread over the five prompt words (``count // 5``
    each, the remainder to the first words). Deterministic for a given seed; read from the
    memory or disk cache when made before.
    """
    spec = tuple((int(length), int(count)) for length, count in spec)
    key = (model_key(model), spec, seed)
    if key not in _CACHE:
        path = templates_path(model, spec, seed)
        groups = _read(path, spec, seed)
        if groups is None:
            groups = _generate(model, spec, seed)
            _write(path, groups, spec, seed, model)
        _CACHE[key] = groups
    return [list(g) for g in _CACHE[key]]


def _generate(model, spec: tuple[tuple[int, int], ...], seed: int) -> list[list[str]]:
    generator = torch.Generator().manual_seed(seed)
    groups = [["{}"]]
    for length, count in spec:
        group = []
        for i, word in enumerate(PROMPT_WORDS):
            n = count // len(PROMPT_WORDS) + (i < count % len(PROMPT_WORDS))
            if n == 0:
                continue
            prefix = tokens.encode(model, word)
            for row in sample_tokens(model, prefix, n, max(length, len(prefix)), generator, top_k=5):
                text = model.tokenizer.decode(row, skip_special_tokens=True)
                group.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(group)
    return groups


def _read(path: Path, spec: tuple[tuple[int, int], ...], seed: int) -> list[list[str]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    groups = data.get("groups")
    if (data.get("spec") != [list(p) for p in spec] or data.get("seed") != seed or not isinstance(groups, list)
            or len(groups) != len(spec) + 1 or groups[0] != ["{}"]
            or any(len(g) != count for g, (_, count) in zip(groups[1:], spec))):
        return None
    return [[str(t) for t in g] for g in groups]


def _write(path: Path, groups: list[list[str]], spec, seed: int, model) -> None:
    data = {"model": str(getattr(model, "model_name", "")), "spec": [list(p) for p in spec], "seed": seed,
            "groups": groups}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8"))


def clear_cache() -> None:
    """Forget the templates kept in memory (the disk cache stays)."""
    _CACHE.clear()
